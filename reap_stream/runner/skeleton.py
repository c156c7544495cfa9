"""The mlx_lm model of a checkpoint as a skeleton that is never evaluated whole, filled one layer
at a time, and run through mlx_lm's own code with the MoE block swapped for an exact capture.

The whole `Model(args)` is instantiated (its random init stays lazy and is never evaluated), and
only layer i's tensors are read, from the shards' byte ranges, into it (runner/weights.py). Each layer's
call convention (mask, cache, extra arguments) is taken from the model's own forward: the decoder
layers are swapped for tracers that record their arguments and pass the hidden state through, so
attention masks, sliding windows and the like are exactly what mlx_lm builds. The MoE block of a
layer is swapped for a hook that routes exactly and evaluates experts grouped by expert
(families/experts.capture); everything else is mlx_lm's own code.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..blas import mlx_core
from ..errors import BadInput
from ..families.expert_source import ExpertSource
from ..families.table import Family, attr
from ..io.safetensors import Checkpoint, TensorRef
from .chunks import Chunk, make_chunks
from .cpu import float32_attention, float32_linears
from .trace import Tracer

if TYPE_CHECKING:
    from ..families.model import Model


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
    float32_linears(model)
    return model


class MoEHook:
    """Replaces a layer's MoE block for one call: exact routing, grouped experts, callback."""

    def __init__(self, block, fam: Family, layer: int, top_k: int, num_experts: int,
                 on_capture: Callable | None, check: bool, where: str, pair: Callable | None = None,
                 plan=None):
        from ..families.experts import ExpertPlan

        self.block, self.fam, self.layer = block, fam, layer
        self.top_k, self.num_experts = top_k, num_experts
        self.on_capture, self.check, self.where = on_capture, check, where
        self.pair = pair  # shares the experts out to two lanes (experts.Pair)
        self.plan = plan or ExpertPlan()

    def __call__(self, x):
        from ..families import experts
        from ..families.self_check import self_check

        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        cap = experts.capture(self.block, self.fam, flat, self.top_k, self.num_experts, self.pair, plan=self.plan,
                              check=self.check)
        if self.check:
            self_check(self.block, self.fam, cap, self.layer, self.where)
        if self.on_capture is not None:
            self.on_capture(cap)
        return cap.output.reshape(shape)


class LayerMoEHook(MoEHook):
    """For a family whose MoE is two attributes of the decoder layer (Gemma-4: `router` on the
    residual stream, `experts` on a second pre-norm): the layer's own router module selects and
    weighs, the logits of its projection are recorded, and the experts module is replaced by this
    hook, called as the layer calls it: (x, top-k indices, top-k weights)."""

    def install(self, layer) -> Callable[[], None]:
        """Put the hook in place on `layer`; returns what takes it out again."""
        owner_path, _, proj_name = self.fam.router.rpartition(".")
        owner = attr(layer, owner_path) if owner_path else layer
        proj = owner[proj_name]
        experts_name = self.fam.stacked.partition(".")[0]
        self.experts = layer[experts_name]
        self.logits = None

        def record(x):
            self.logits = proj(x)
            return self.logits

        owner[proj_name], layer[experts_name] = record, self

        def remove():
            owner[proj_name], layer[experts_name] = proj, self.experts
        return remove

    def __getattr__(self, name):  # while in place, the layer's `experts.<stack>` is reached through here
        experts = self.__dict__.get("experts")
        if experts is None:
            raise AttributeError(name)
        return getattr(experts, name)

    def __call__(self, x, inds, weights):
        from ..families import experts
        from ..families.routing import Routed
        from ..families.self_check import self_check

        mx = mlx_core()
        shape, k = x.shape, inds.shape[-1]
        flat = x.reshape(-1, shape[-1])
        logits = self.logits.reshape(-1, self.logits.shape[-1])
        routed = Routed(inds.reshape(-1, k), weights.reshape(-1, k), mx.softmax(logits.astype(mx.float32), axis=-1))
        cap = experts.capture(self.block, self.fam, flat, k, self.num_experts, self.pair, routed=routed, plan=self.plan)
        if self.check:
            def reference(xr, rows):
                return self.experts(xr, routed.inds[None, :rows], routed.weights[None, :rows])
            self_check(self.block, self.fam, cap, self.layer, self.where, reference)
        if self.on_capture is not None:
            self.on_capture(cap)
        return cap.output.reshape(shape)


class Forward:
    """What both runners share: the skeleton, its MoE layers, and one layer's forward with hooks.

    `sources` holds the current layer's expert source where its experts are read by byte range
    (stream mode), `chunk_bytes` how many bytes of experts a chunk may hold (None: all), `kernel`
    which expert kernel runs them (chunks.EXPERT_KERNELS)."""

    def __init__(self, model, family: Family, top_k: int, where: str, chunk_bytes: int | None = None,
                 kernel: str = "auto"):
        from ..families.masking import moe_blocks

        self.model = model
        self.family = family
        self.where = where
        self.blocks = moe_blocks(model, family)   # layer -> MoE block
        self.num_layers = len(model.layers)
        self.top_k = top_k
        self.chunk_bytes, self.kernel = chunk_bytes, kernel
        self.sources: dict[int, ExpertSource] = {}

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self.blocks)

    def num_experts(self, layer: int) -> int:
        """Routed experts of a layer: its byte-range source's, else its loaded stack's."""
        from ..families.masking import router_experts
        if layer in self.sources:
            return self.sources[layer].num_experts
        return router_experts(self.blocks[layer], self.family)

    def loaded_params(self, i: int) -> list:
        """Layer i's parameters, less a routed-expert stack that is read by range (lazy, never
        to be evaluated)."""
        from mlx.utils import tree_flatten

        params = [a for _, a in tree_flatten(self.model.layers[i].parameters())]
        if i not in self.sources:
            return params
        stack = {id(a) for _, a in tree_flatten(getattr(self.blocks[i], self.family.stacked).parameters())}
        return [a for a in params if id(a) not in stack]

    def expert_width(self, layer: int) -> int:
        """Width of layer's expert outputs: the hidden size, or the experts' latent size."""
        from ..families.stacks import out_dims
        return out_dims(attr(self.blocks[layer], self.family.stacked))

    def hook(self, i: int, on_capture: Callable | None, check: bool, pair: Callable | None = None) -> MoEHook:
        from ..families.experts import ExpertPlan

        plan = ExpertPlan(self.sources.get(i), self.chunk_bytes, self.kernel)
        kind = LayerMoEHook if not self.family.block else MoEHook
        return kind(self.blocks[i], self.family, i, self.top_k, self.num_experts(i), on_capture, check,
                    self.where, pair, plan)

    def layer_forward(self, i: int, h, tracer: Tracer, on_capture: Callable | None, check: bool,
                      pair: Callable | None = None, states: dict | None = None):
        """Layer i on h with the arguments the model's forward gives it (`states`: the previous
        layer's state outputs it takes, by (layer, index)); a layer returning (h, *state) returns
        that tuple."""
        layer = self.model.layers[i]
        args, kwargs = tracer.bind(states or {})
        if i not in self.blocks:
            with float32_attention():
                return layer(h, *args, **kwargs)
        block = self.blocks[i]
        hook = self.hook(i, on_capture, check, pair)
        if isinstance(hook, LayerMoEHook):
            remove = hook.install(layer)
            try:
                return layer(h, *args, **kwargs)
            finally:
                remove()
        # decoder layers call self.<block>(x); swapping the dict entry keeps the rest mlx_lm's code
        layer[self.family.block] = hook
        try:
            with float32_attention():
                return layer(h, *args, **kwargs)
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


def layer_prefix(model, where: str) -> str:
    """"model.layers." (or the model's own spelling): the name prefix of decoder layer parameters."""
    first = model.layers[0]
    for path, module in model.named_modules():
        if module is first:
            return path[: -len(".0")] + "."
    raise BadInput(where, "cannot locate decoder layers in the mlx_lm model")


def open_skeleton(model: "Model"):
    """(skeleton, weights) of a model: a safetensors checkpoint's skeleton is quantised like it and
    filled from its shards, a GGUF's is float32 and filled from the GGUF (runner/gguf_weights)."""
    if model.is_gguf:
        from .gguf_weights import GGUFWeights, gguf_skeleton

        skeleton = gguf_skeleton(model)
        return skeleton, GGUFWeights(model, skeleton, model.where)
    from .weights import Weights

    ckpt = model.require_checkpoint("running the model")
    skeleton = build_skeleton(ckpt)
    return skeleton, Weights(ckpt, skeleton, model.family, model.where)
