"""The "masked original": an mlx_lm model whose pruned experts can never be routed.

Output of a physically pruned checkpoint (experts removed, router rows sliced) must equal the
masked original. The rule per routing type:
- logits: the router's logits for pruned experts become -inf (a -inf bias on the router Linear).
  softmax-over-all + top-k (+ renorm) then equals softmax over the kept experts; top-k on raw
  logits + softmax over k never picks them.
- selection_bias: routers with a selection-only bias (DeepSeek-V3, GLM-4.5, MiniMax, ...).
  sigmoid(-inf) = 0 could still be picked (bias, zero-filled losing groups), so the bias = -inf for
  pruned ids instead: they drop out of the group scores and the top-k. Exact only while kept
  selection scores stay positive where mlx_lm zero-fills losing groups (docs/routing.md), which
  holds for bias >= 0. A softmax scored router with a selection bias gets both rules (the softmax
  denominator must lose the pruned experts too).
- a router that is a raw weight without any bias (DeepSeek, DeepSeek-V2) has no place for a -inf:
  its gate is given one more input feature, constant 1, whose weight column is 0 for kept and
  -inf for pruned experts, so mlx_lm's own gate code computes the masked logits.
The rule is derived from the family's route and the block (`mask_rules`).
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from .table import FAMILIES, MODEL_TYPES, Family, attr


def _attr(obj, path: str):
    return attr(obj, path, None)


# `model` parameters below are loaded mlx_lm models (mlx.nn.Module with .layers); left untyped so
# this module imports without mlx.

def moe_spec(model) -> Family:
    """The family row of a loaded mlx_lm model, by the module of its class (aliases and
    architecture remaps load the family's own class), else by model_type (ValueError when it is
    not an MoE family)."""
    module = type(model).__module__.rpartition(".")[2]
    if module in FAMILIES:
        return FAMILIES[module]
    model_type = getattr(model, "model_type", None) or getattr(model.args, "model_type", None)
    if model_type not in MODEL_TYPES or MODEL_TYPES[model_type].refused:
        raise ValueError(f"no MoE family entry for model_type {model_type!r}")
    return MODEL_TYPES[model_type]


def moe_blocks(model, spec: Family | None = None) -> dict[int, object]:
    """Layer index -> MoE block, dense layers skipped."""
    spec = spec or moe_spec(model)
    out = {}
    for i, layer in enumerate(model.layers):
        block = getattr(layer, spec.block, None) if spec.block else layer
        if block is not None and _attr(block, spec.router) is not None and _attr(block, spec.stacked) is not None:
            out[i] = block
    return out


def router_experts(block, spec: Family) -> int:
    """Routed experts of one loaded MoE block (an mlx_lm module), read from its expert stack (the
    router may hold more rows: LongCat's identity experts)."""
    from .stacks import num_experts

    return num_experts(_attr(block, spec.stacked))


def _top_k(block) -> int:
    """The block's top-k, where it keeps one (for the kept >= top-k check; 1 where it does not)."""
    for path in ("top_k", "num_experts_per_tok", "k", "gate.top_k", "router.top_k", "args.num_experts_per_token"):
        value = _attr(block, path)
        if isinstance(value, int):
            return value
    return 1


def mask_rules(block, spec: Family) -> tuple[str, ...]:
    """How pruned experts of this block are made unselectable: "selection_bias", "logits" (a -inf
    bias on the router Linear), "input_column" (raw-weight routers without any bias), or two."""
    from .routing import score_fn, selection_bias

    route = spec.route
    if selection_bias(block, route) is not None:
        return ("selection_bias", "logits") if score_fn(block, route) == "softmax" else ("selection_bias",)
    return ("input_column",) if route.logits in ("weight", "weight_f32") else ("logits",)


def mask_experts(model, pruned: dict[int, list[int]], spec: Family | None = None) -> None:
    """Patch `model` in place so experts pruned[L] of layer L are never routed."""
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
        router = _attr(block, spec.router)
        rows = int(router["weight"].shape[0])
        if rows > n:  # rows past the stack: experts without weights (identity), never pruned
            keep = np.concatenate([keep, np.ones(rows - n, dtype=bool)])
        for rule in mask_rules(block, spec):
            _MASKS[rule](block, spec, router, keep, layer)


def _mask_selection_bias(block, spec: Family, router, keep: np.ndarray, layer: int) -> None:
    import mlx.core as mx

    owner_path, _, name = spec.route.bias.rpartition(".")
    owner = _attr(block, owner_path) if owner_path else block
    bias = owner[name]
    if spec.route.groups and float(bias.min()) < 0 and spec.route.group_fill == 0.0:
        warnings.warn(
            f"layer {layer}: negative selection bias; with zero-filled losing groups "
            "a pruned expert may still win where the masked original cannot (docs/routing.md)",
            stacklevel=3,
        )
    owner[name] = mx.where(mx.array(keep), bias, mx.array(-np.inf, bias.dtype))


def _mask_logits(block, spec: Family, router, keep: np.ndarray, layer: int) -> None:
    import mlx.core as mx

    # nn.Linear and nn.QuantizedLinear both add self["bias"] when present.
    dtype = router.scales.dtype if hasattr(router, "scales") else router.weight.dtype
    add = mx.array(np.where(keep, 0.0, -np.inf).astype(np.float32)).astype(dtype)
    router.bias = router.bias + add if "bias" in router else add


def _mask_input_column(block, spec: Family, router, keep: np.ndarray, layer: int) -> None:
    """The gate's own code computes x' @ W'.T with x' = [x, 1] and W' = [W | m], m = 0 for kept
    and -inf for pruned experts: the masked logits, with no bias for the gate to add."""
    import mlx.core as mx

    column = mx.array(np.where(keep, 0.0, -np.inf).astype(np.float32))[:, None]
    router.__class__ = _augmented_class(type(router))
    router.reap_column = column.astype(router.weight.dtype)


_AUGMENTED: dict[type, type] = {}


def _augmented_class(cls: type) -> type:
    """A subclass of a raw-weight gate whose call appends the constant input feature."""
    if cls in _AUGMENTED or getattr(cls, "_reap_augmented", False):
        return _AUGMENTED.get(cls, cls)
    import mlx.core as mx

    def __call__(self, x):
        weight = self.weight
        self.weight = mx.concatenate([weight, self.reap_column], axis=1)
        try:
            return cls.__call__(self, mx.concatenate([x, mx.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1))
        finally:
            self.weight = weight

    _AUGMENTED[cls] = type(f"Masked{cls.__name__}", (cls,), {"__call__": __call__, "_reap_augmented": True})
    return _AUGMENTED[cls]


def unmask_router(router, had_bias: bool) -> None:
    """Take off what masking added to a router module (the stream runner reuses its modules)."""
    if not had_bias and "bias" in router:
        del router["bias"]
    if "reap_column" in router:
        del router["reap_column"]
        router.__class__ = type(router).__mro__[1]


_MASKS = {"selection_bias": _mask_selection_bias, "logits": _mask_logits, "input_column": _mask_input_column}


def routing_counts(model, tokens: np.ndarray) -> dict[int, np.ndarray]:
    """Per MoE layer, how often each expert is selected on `tokens` (one forward pass)."""
    import mlx.core as mx
    import mlx.nn as nn

    spec = moe_spec(model)
    blocks = moe_blocks(model, spec)
    seen: dict[int, list] = {i: [] for i in blocks}

    class _Recorder(nn.Module):
        def __init__(self, inner, layer, expert=None):
            super().__init__()
            self.inner = inner
            self._layer, self._expert = layer, expert

        def __call__(self, x, indices=None):
            if self._expert is None:
                seen[self._layer].append(np.array(indices).reshape(-1))
                return self.inner(x, indices)
            seen[self._layer].append(np.full(max(1, x.size // x.shape[-1]), self._expert))  # a list's expert e
            return self.inner(x)

    def place(block, make) -> None:
        owner_path, _, name = spec.stacked.rpartition(".")
        owner = _attr(block, owner_path) if owner_path else block
        owner[name] = make(owner[name])

    originals = {i: _attr(b, spec.stacked) for i, b in blocks.items()}
    try:
        for i, b in blocks.items():
            place(b, lambda stack, i=i: [_Recorder(m, i, e) for e, m in enumerate(stack)]
                  if isinstance(stack, list) else _Recorder(stack, i))
        mx.eval(model(mx.array(np.asarray(tokens).reshape(1, -1))))
    finally:
        for i, b in blocks.items():
            place(b, lambda stack, i=i: originals[i])
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
