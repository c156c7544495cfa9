"""The "masked original": an mlx_lm model whose pruned experts can never be routed.

Output of a physically pruned checkpoint (experts removed, router rows sliced) must equal the
masked original. The rule per routing type:
- logits: the router's logits for pruned experts become -inf (a -inf bias on the router Linear).
  softmax-over-all + top-k (+ renorm) then equals softmax over the kept experts; top-k on raw
  logits + softmax over k never picks them.
- selection_bias: sigmoid routers (DeepSeek-V3, GLM-4.5). sigmoid(-inf) = 0 could still be picked
  (bias, zero-filled losing groups), so e_score_correction_bias = -inf for pruned ids instead: they
  drop out of the group scores and the top-k. Exact only while kept selection scores stay positive
  (mlx_lm zero-fills losing groups; docs/routing.md), which holds for bias >= 0.
The rule is derived from the family's routing kind (Routing.mask_rule).
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from .table import FAMILIES, Family


# `model` parameters below are loaded mlx_lm models (mlx.nn.Module with .layers); left untyped so
# this module imports without mlx.

def moe_spec(model) -> Family:
    """The family row of a loaded mlx_lm model (ValueError when it is not an MoE family)."""
    model_type = getattr(model, "model_type", None) or getattr(model.args, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"no MoE family entry for model_type {model_type!r}")
    return FAMILIES[model_type]


def moe_blocks(model, spec: Family | None = None) -> dict[int, object]:
    """Layer index -> MoE block, dense layers skipped."""
    spec = spec or moe_spec(model)
    out = {}
    for i, layer in enumerate(model.layers):
        block = getattr(layer, spec.block, None)
        if block is not None and hasattr(block, spec.router) and hasattr(block, spec.stacked):
            out[i] = block
    return out


def router_experts(block, spec: Family) -> int:
    """Routed experts of one loaded MoE block (an mlx_lm module), read from its router's shape."""
    router = getattr(block, spec.router)
    if spec.routing.mask_rule == "selection_bias":
        return int(router.e_score_correction_bias.shape[0])
    return int(router.weight.shape[0])


def _top_k(block) -> int:
    for attr in ("top_k", "num_experts_per_tok"):
        if hasattr(block, attr):
            return int(getattr(block, attr))
    return int(block.gate.top_k)


def mask_experts(model, pruned: dict[int, list[int]], spec: Family | None = None) -> None:
    """Patch `model` in place so experts pruned[L] of layer L are never routed."""
    import mlx.core as mx

    spec = spec or moe_spec(model)
    blocks = moe_blocks(model, spec)
    for layer, ids in sorted(pruned.items()):
        ids = sorted(set(int(e) for e in ids))
        if not ids:
            continue
        if layer not in blocks:
            raise ValueError(f"layer {layer} has no MoE block to mask")
        block = blocks[layer]
        n = router_experts(block, spec)
        if ids[0] < 0 or ids[-1] >= n:
            raise ValueError(f"layer {layer}: expert ids must be in 0..{n - 1}, got {ids}")
        if n - len(ids) < _top_k(block):
            raise ValueError(f"layer {layer}: {n - len(ids)} kept experts < top_k {_top_k(block)}")
        keep = np.ones(n, dtype=bool)
        keep[ids] = False
        router = getattr(block, spec.router)
        rule = spec.routing.mask_rule
        if rule == "selection_bias":
            bias = router.e_score_correction_bias
            if getattr(router, "n_group", 1) > 1 and float(bias.min()) < 0:
                warnings.warn(
                    f"layer {layer}: negative e_score_correction_bias; with zero-filled losing groups "
                    "a pruned expert may still win where the masked original cannot (docs/routing.md)",
                    stacklevel=2,
                )
            router.e_score_correction_bias = mx.where(mx.array(keep), bias, mx.array(-np.inf, bias.dtype))
        elif rule == "logits":
            # nn.Linear and nn.QuantizedLinear both add self["bias"] when present.
            dtype = router.scales.dtype if hasattr(router, "scales") else router.weight.dtype
            add = mx.array(np.where(keep, 0.0, -np.inf).astype(np.float32)).astype(dtype)
            router.bias = router.bias + add if "bias" in router else add
        else:
            raise ValueError(f"unknown masking rule {rule!r}")


def routing_counts(model, tokens: np.ndarray) -> dict[int, np.ndarray]:
    """Per MoE layer, how often each expert is selected on `tokens` (one forward pass)."""
    import mlx.core as mx
    import mlx.nn as nn

    spec = moe_spec(model)
    blocks = moe_blocks(model, spec)
    seen: dict[int, list] = {i: [] for i in blocks}

    class _Recorder(nn.Module):
        def __init__(self, inner, layer):
            super().__init__()
            self.inner = inner
            self._layer = layer

        def __call__(self, x, indices):
            seen[self._layer].append(np.array(indices).reshape(-1))
            return self.inner(x, indices)

    originals = {i: getattr(b, spec.stacked) for i, b in blocks.items()}
    try:
        for i, b in blocks.items():
            setattr(b, spec.stacked, _Recorder(originals[i], i))
        mx.eval(model(mx.array(np.asarray(tokens).reshape(1, -1))))
    finally:
        for i, b in blocks.items():
            setattr(b, spec.stacked, originals[i])
    return {
        i: np.bincount(np.concatenate(seen[i]), minlength=router_experts(blocks[i], spec))
        for i in blocks
    }


def masked_logits(model_dir: str | os.PathLike, pruned: dict[int, list[int]], tokens: np.ndarray, *,
                  float32: bool = False) -> np.ndarray:
    """Logits [T, V] (float32) of the checkpoint at model_dir with `pruned` experts masked.
    float32=True upcasts floating weights first (MLX's CPU gather_mm runs only in float32)."""
    from pathlib import Path

    import mlx.core as mx
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(model_dir))
    if float32:
        model.set_dtype(mx.float32)
    mask_experts(model, pruned)
    out = model(mx.array(np.asarray(tokens).reshape(1, -1)))
    return np.array(out[0].astype(mx.float32))
