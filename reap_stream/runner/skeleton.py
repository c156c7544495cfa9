"""The mlx_lm model of a checkpoint as a skeleton that is never evaluated whole, filled one layer
at a time, and run through mlx_lm's own code with the MoE block swapped for an exact capture.

The whole `Model(args)` is instantiated (its random init stays lazy and is never evaluated), and
only layer i's tensors are read, from the shards' byte ranges, into it (`Weights`). Each layer's
call convention (mask, cache, extra arguments) is taken from the model's own forward: the decoder
layers are swapped for tracers that record their arguments and pass the hidden state through, so
attention masks, sliding windows and the like are exactly what mlx_lm builds. The MoE block of a
layer is swapped for a hook that routes exactly and evaluates experts grouped by expert
(families/experts.capture); everything else is mlx_lm's own code.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..blas import mlx_core
from ..errors import BadInput
from ..families.table import Family, classify
from ..io.safetensors import Checkpoint, TensorRef, read_array
from .chunks import Chunk, make_chunks

if TYPE_CHECKING:
    from ..families.model import Model


_MX_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "U32": "uint32", "U8": "uint8",
              "I32": "int32", "I8": "int8", "U16": "uint16", "I64": "int64"}


def to_mx(ref: TensorRef):
    """An mx.array holding exactly the bytes of one tensor (read from its byte range only)."""
    mx = mlx_core()
    if ref.dtype not in _MX_DTYPES:
        raise BadInput(ref.file, f"tensor {ref.name!r}: dtype {ref.dtype} is not supported by the streaming runner")
    # one map per tensor, gone once copied: a map kept for a whole layer would hold the layer's
    # pages in RSS next to their copies (measured: +43 MiB peak on an h512 / 64-expert model)
    arr = np.ascontiguousarray(read_array(ref))
    if ref.dtype == "BF16":
        return mx.array(arr).view(mx.bfloat16)
    return mx.array(arr)


# modes whose scales are stored as uint8 allow one (bits, group size) each; affine keeps float scales
_UINT8_SCALE_MODES = {(4, 16): "nvfp4", (4, 32): "mxfp4", (8, 32): "mxfp8"}


def packing(path: str, in_dims: int, tensors: dict[str, TensorRef]) -> dict:
    """group_size, bits and mode a saved quantised weight was packed with, read from its shapes
    (for modules the config's per-path quantization map does not name)."""
    scales, weight = tensors[f"{path}.scales"], tensors[f"{path}.weight"]
    group_size = in_dims // scales.shape[-1]
    bits = weight.shape[-1] * 32 // in_dims
    if scales.dtype != "U8":
        return {"group_size": group_size, "bits": bits, "mode": "affine"}
    mode = _UINT8_SCALE_MODES.get((bits, group_size))
    if mode is None:
        raise BadInput(weight.file, f"cannot tell how {path} was quantised ({bits} bits, group size {group_size})")
    return {"group_size": group_size, "bits": bits, "mode": mode}


def model_from_config(config: dict, where: str | Path):
    """The mlx_lm Model of a config, with nothing evaluated (its random init stays lazy)."""
    from mlx_lm.utils import _get_classes

    mlx_core()
    try:
        model_class, args_class = _get_classes(dict(config))
    except ValueError as e:
        raise BadInput(where, str(e)) from None
    try:
        return model_class(args_class.from_dict(dict(config)))
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:  # a config mlx_lm cannot use
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise BadInput(where, f"mlx_lm cannot build a {config.get('model_type')} model from it "
                              f"({type(e).__name__}: {first})") from None


def build_skeleton(ckpt: Checkpoint):
    """The mlx_lm Model of ckpt's config, quantised like the checkpoint, with nothing evaluated."""
    mlx_core()
    import mlx.nn as nn

    config = dict(ckpt.config)
    model = model_from_config(config, ckpt.root / "config.json")
    quant = config.get("quantization")
    if quant is not None:
        def predicate(path, module):
            if path in quant:
                return quant[path]
            if not hasattr(module, "to_quantized") or f"{path}.scales" not in ckpt.tensors:
                return False
            return packing(path, module.weight.shape[-1], ckpt.tensors)

        nn.quantize(model, group_size=quant["group_size"], bits=quant["bits"],
                    mode=quant.get("mode", "affine"), class_predicate=predicate)
    return model


def layer_list(model) -> list:
    """The list object the inner model iterates over (so its items can be swapped)."""
    for holder in (getattr(model, "model", None), model):
        layers = getattr(holder, "layers", None) if holder is not None else None
        if isinstance(layers, list) and layers and layers[0] is model.layers[0]:
            return layers
    raise BadInput("model", f"cannot find the decoder layer list of {type(model).__module__}")


class Tracer:
    """Stands in for a decoder layer: records its call arguments, passes the hidden state on."""

    def __init__(self, out=None):
        self.args: tuple = ()
        self.kwargs: dict = {}
        self.x = None
        self.out = out
        self.model_output = None  # set on tracer 0: the model's (lazy) output

    def __call__(self, x, *args, **kwargs):
        self.x, self.args, self.kwargs = x, args, kwargs
        return x if self.out is None else self.out


def trace_layers(model, tokens: np.ndarray, final=None) -> list[Tracer]:
    """Run the model's own forward with tracers in place of its layers (nothing heavy is evaluated).

    Tracer i holds layer i's arguments; tracer 0's input `x` is the embedding output. With `final`
    given, every tracer returns it, so the model's output is its head applied to `final`.
    """
    mx = mlx_core()
    layers = layer_list(model)
    saved = list(layers)
    tracers = [Tracer(final) for _ in layers]
    try:
        layers[:] = tracers
        out = model(mx.array(tokens))
    finally:
        layers[:] = saved
    tracers[0].model_output = out
    return tracers


# ------------------------------------------------------------------ MoE hook

class MoEHook:
    """Replaces a layer's MoE block for one call: exact routing, grouped experts, callback."""

    def __init__(self, block, fam: Family, layer: int, top_k: int, num_experts: int,
                 on_capture: Callable | None, check: bool, where: str, pair: Callable | None = None):
        self.block, self.fam, self.layer = block, fam, layer
        self.top_k, self.num_experts = top_k, num_experts
        self.on_capture, self.check, self.where = on_capture, check, where
        self.pair = pair  # shares the experts out to two lanes (experts.Pair)

    def __call__(self, x):
        from ..families import experts

        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        cap = experts.capture(self.block, self.fam, flat, self.top_k, self.num_experts, self.pair)
        if self.check:
            experts.self_check(self.block, self.fam, cap, self.layer, self.where)
        if self.on_capture is not None:
            self.on_capture(cap)
        return cap.output.reshape(shape)


class Forward:
    """What both runners share: the skeleton, its MoE layers, and one layer's forward with hooks."""

    def __init__(self, model, family: Family, top_k: int, where: str):
        from ..families.masking import moe_blocks

        self.model = model
        self.family = family
        self.where = where
        self.blocks = moe_blocks(model, family)   # layer -> MoE block
        self.num_layers = len(model.layers)
        self.top_k = top_k

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self.blocks)

    def num_experts(self, layer: int) -> int:
        from ..families.masking import router_experts
        return router_experts(self.blocks[layer], self.family)

    def hook(self, i: int, on_capture: Callable | None, check: bool, pair: Callable | None = None) -> MoEHook:
        return MoEHook(self.blocks[i], self.family, i, self.top_k, self.num_experts(i), on_capture, check,
                        self.where, pair)

    def layer_forward(self, i: int, h, tracer: Tracer, on_capture: Callable | None, check: bool,
                      pair: Callable | None = None):
        layer = self.model.layers[i]
        if i not in self.blocks:
            return layer(h, *tracer.args, **tracer.kwargs)
        block = self.blocks[i]
        hook = self.hook(i, on_capture, check, pair)
        # decoder layers call self.<block>(x); swapping the dict entry keeps the rest mlx_lm's code
        layer[self.family.block] = hook
        try:
            return layer(h, *tracer.args, **tracer.kwargs)
        finally:
            layer[self.family.block] = block


class Runs:
    """What both runners tell about the model they run (their `fwd` is a Forward) and how they
    batch calibration sequences (their `chunk_tokens`)."""

    fwd: Forward
    chunk_tokens: int

    @property
    def family(self) -> Family:
        return self.fwd.family

    @property
    def num_layers(self) -> int:
        return self.fwd.num_layers

    @property
    def moe_layers(self) -> list[int]:
        return self.fwd.moe_layers

    def chunks(self, sequences, max_batch: int | None = None) -> list[Chunk]:
        return make_chunks(sequences, self.chunk_tokens, max_batch)


def open_skeleton(model: "Model"):
    """(skeleton, weights) of a model: a safetensors checkpoint's skeleton is quantised like it and
    filled from its shards, a GGUF's is float32 and filled from the GGUF (runner/gguf_weights)."""
    if model.is_gguf:
        from .gguf_weights import GGUFWeights, gguf_skeleton

        skeleton = gguf_skeleton(model)
        return skeleton, GGUFWeights(model, skeleton, model.where)
    ckpt = model.require_checkpoint("running the model")
    skeleton = build_skeleton(ckpt)
    return skeleton, Weights(ckpt, skeleton, model.family, model.where)


def layer_prefix(model, where: str) -> str:
    """"model.layers." (or the model's own spelling): the name prefix of decoder layer parameters."""
    first = model.layers[0]
    for path, module in model.named_modules():
        if module is first:
            return path[: -len(".0")] + "."
    raise BadInput(where, "cannot locate decoder layers in the mlx_lm model")


class Weights:
    """Reads one decoder layer's tensors (or the ones outside the layers) from a checkpoint's byte
    ranges into a skeleton, and drops them again. Hugging Face-layout tensors go through the
    family's own `sanitize` (per layer); a non-uniform prune's expert-axis tensors keep their
    layer's count."""

    def __init__(self, ckpt: Checkpoint, model, family: Family, where: str):
        from mlx.utils import tree_flatten

        self.ckpt, self.model, self.family, self.where = ckpt, model, family, where
        self.params = {n: (tuple(a.shape), a.dtype) for n, a in tree_flatten(model.parameters())}
        self.prefix = self._layer_prefix()
        self.mlx_layout = set(ckpt.tensors) <= set(self.params)
        # a non-uniform prune (apply's config record): MoE layer -> experts it holds
        record = ckpt.config.get("reap_stream") or {}
        self.layer_experts = {int(k): int(v) for k, v in (record.get("layer_experts") or {}).items()}

    def _layer_prefix(self) -> str:
        return layer_prefix(self.model, self.where)

    def names_of(self, layer: int | None) -> list[str]:
        """Checkpoint tensors of one decoder layer, or (None) everything outside the layers."""
        if layer is None:
            return sorted(n for n in self.ckpt.tensors if not n.startswith(self.prefix))
        p = f"{self.prefix}{layer}."
        return sorted(n for n in self.ckpt.tensors if n.startswith(p))

    def load(self, layer: int | None, skip: Callable[[str], bool] = lambda name: False) -> list[str]:
        """Read one layer's (or the non-layer) tensors into the skeleton; returns parameter names."""
        weights = {n: to_mx(self.ckpt.tensors[n]) for n in self.names_of(layer) if not skip(n)}
        if not self.mlx_layout and hasattr(self.model, "sanitize"):
            weights = self._sanitize(weights, layer)
        table = self.params
        for n, a in weights.items():
            if n not in table:
                where = self.ckpt.tensors[n].file if n in self.ckpt.tensors else self.ckpt.root
                raise BadInput(where, f"tensor {n!r} is not a parameter of mlx_lm's {self.ckpt.model_type} model")
            if tuple(a.shape) != table[n][0] and not self._pruned_shape(n, tuple(a.shape), table[n][0], layer):
                raise BadInput(self.ckpt.root, f"tensor {n!r} has shape {list(a.shape)}, the model expects {list(table[n][0])}")
        if layer is not None:
            want = [n for n in table if n.startswith(f"{self.prefix}{layer}.")]
            missing = sorted(set(want) - set(weights))
            if missing:
                raise BadInput(self.ckpt.root, f"layer {layer}: tensor {missing[0]!r} is missing from the checkpoint")
        self.model.load_weights(list(weights.items()), strict=False)
        return list(weights)

    def _pruned_shape(self, name: str, shape: tuple, model_shape: tuple, layer: int | None) -> bool:
        """True for an expert-axis tensor of a non-uniform prune: mlx_lm builds every layer with one
        count, the stored tensor holds this layer's (routing follows the router's width)."""
        rel = classify(name, self.family)
        return (rel is not None and layer is not None and rel.kind in ("stacked", "router")
                and shape[1:] == model_shape[1:] and shape[0] == self.layer_experts.get(layer))

    def _sanitize(self, weights: dict, layer: int | None) -> dict:
        # Family sanitizers look for layer 0's names (e.g. mixtral); present layer i as layer 0.
        if layer is None:
            return self.model.sanitize(weights)
        src, dst = f"{self.prefix}{layer}.", f"{self.prefix}0."
        renamed = {dst + n[len(src):]: a for n, a in weights.items()}
        out = self.model.sanitize(renamed)
        return {src + n[len(dst):] if n.startswith(dst) else n: a for n, a in out.items()}

    def drop(self, names: list[str]) -> None:
        """Replace loaded tensors by lazy zeros, which hold no memory."""
        mx = mlx_core()
        self.model.load_weights([(n, mx.zeros(self.params[n][0], self.params[n][1])) for n in names], strict=False)
        mx.clear_cache()
