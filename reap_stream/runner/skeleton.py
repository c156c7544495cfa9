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

from typing import Callable

import numpy as np

from ..blas import mlx_core
from ..errors import BadInput
from ..families.table import Family, attr, classify, layer_of
from ..io.safetensors import Checkpoint, TensorRef, read_array


class _ShapeProxy:
    """What mlx_lm's quantisation inference reads of a weight: shape and dtype."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, dtype


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


def build_skeleton(ckpt: Checkpoint):
    """The mlx_lm Model of ckpt's config, quantised like the checkpoint, with nothing evaluated."""
    mx = mlx_core()
    import mlx.nn as nn
    from mlx_lm.utils import _get_classes, infer_quant_config

    config = dict(ckpt.config)
    try:
        model_class, args_class = _get_classes(config)
    except ValueError as e:
        raise BadInput(ckpt.root / "config.json", str(e)) from None
    model = model_class(args_class.from_dict(config))
    quant = config.get("quantization")
    if quant is not None:
        proxies = {n: _ShapeProxy(r.shape, getattr(mx, _MX_DTYPES.get(r.dtype, "uint8")))
                   for n, r in ckpt.tensors.items()}

        def predicate(path, module):
            if path in quant:
                return quant[path]
            if not hasattr(module, "to_quantized") or f"{path}.scales" not in proxies:
                return False
            return infer_quant_config(path, module, proxies)

        nn.quantize(model, group_size=quant["group_size"], bits=quant["bits"],
                    mode=quant.get("mode", "affine"), class_predicate=predicate)
    return model


def layer_list(model) -> list:
    """The list object the inner model iterates over (so its items can be swapped): the stored
    list holding model.layers[0], wherever it sits (`model.layers` may be a property returning a
    fresh slice of it, as mlx_lm's pipeline-parallel models do)."""
    first = model.layers[0]
    for path, module in model.named_modules():
        if module is first and path.endswith(".0"):
            holder = model
            for part in path.split(".")[:-2]:
                holder = getattr(holder, part)
            layers = getattr(holder, path.split(".")[-2], None)
            if isinstance(layers, list) and layers and layers[0] is first:
                return layers
    raise BadInput("model", f"cannot find the decoder layer list of {type(model).__module__}")


class Tracer:
    """Stands in for a decoder layer: records its call arguments, passes the hidden state on. The
    model's forward may read the layer's attributes (which mask a hybrid layer takes): those come
    from the layer it stands in for."""

    def __init__(self, out=None, layer=None, index: int = 0, outputs: int = 1, state_is_none: bool = False):
        self.args: tuple = ()
        self.kwargs: dict = {}
        self.x = None
        self.out = out
        self.layer = layer
        self.model_output = None  # set on tracer 0: the model's (lazy) output
        # a layer returning (h, *state) (Family.layer_outputs): the state stands in as markers
        self.extras = tuple(None if state_is_none else State(index, j) for j in range(1, outputs))

    def __getattr__(self, name):
        layer = self.__dict__.get("layer")
        if layer is None:
            raise AttributeError(name)
        return getattr(layer, name)

    def __call__(self, x, *args, **kwargs):
        self.x, self.args, self.kwargs = x, args, kwargs
        h = x if self.out is None else self.out
        return (h, *self.extras) if len(self.extras) else h

    @property
    def needs(self) -> list["State"]:
        """The earlier layers' state outputs this layer is called with."""
        return [v for v in (*self.args, *self.kwargs.values()) if isinstance(v, State)]

    def bind(self, states: dict) -> tuple[tuple, dict]:
        """This layer's call arguments with the state markers replaced by the states themselves."""
        def real(v):
            return states[(v.layer, v.index)] if isinstance(v, State) else v
        return tuple(real(v) for v in self.args), {k: real(v) for k, v in self.kwargs.items()}


def split_outputs(family: Family, out) -> tuple:
    """(h, state) of a layer's output; state is () for layers returning h alone. A state the row
    says is None must be (checked on every call: never carried wrong)."""
    if family.layer_outputs == 1:
        return out, ()
    h, state = out[0], tuple(out[1:])
    if family.state_is_none and any(v is not None for v in state):
        raise BadInput("model", f"{family.model_type}: a decoder layer hands state to the next one "
                                f"(attention residuals?); a layer-by-layer run cannot carry it")
    return h, state


class State:
    """Marks output `index` of layer `layer` where the traced forward hands it to a later layer
    (Hunyuan's cross-layer attention passes K/V on this way)."""

    def __init__(self, layer: int, index: int):
        self.layer, self.index = layer, index


def trace_layers(model, tokens: np.ndarray, final=None, family: Family | None = None) -> list[Tracer]:
    """Run the model's own forward with tracers in place of its layers (nothing heavy is evaluated).

    Tracer i holds layer i's arguments; tracer 0's input `x` is the embedding output. With `final`
    given, every tracer returns it, so the model's output is its head applied to `final`. Layers
    that return (h, *state) (the family's layer_outputs > 1) return state markers; a layer may take
    only its predecessor's state (what the runners carry from one layer to the next).
    """
    mx = mlx_core()
    layers = layer_list(model)
    saved = list(layers)
    outputs, none = (family.layer_outputs, family.state_is_none) if family is not None else (1, False)
    tracers = [Tracer(final, layer, i, outputs, none) for i, layer in enumerate(layers)]
    try:
        layers[:] = tracers
        out = model(mx.array(tokens))
    except (TypeError, ValueError) as e:  # e.g. unpacking a tuple the tracer did not return
        raise _not_layer_by_layer(model, f"its forward failed with layers traced ({e})") from None
    finally:
        layers[:] = saved
    for i in range(1, len(tracers)):
        previous = tracers[i - 1].x if final is None else final
        if tracers[i].x is not previous:
            raise _not_layer_by_layer(model, f"decoder layer {i} does not take layer {i - 1}'s output as its input")
        if any(s.layer != i - 1 for s in tracers[i].needs):
            raise _not_layer_by_layer(model, f"decoder layer {i} takes state from a layer before layer {i - 1}")
    if tuple(getattr(out, "shape", ())[:-1]) != tuple(np.shape(tokens)):
        raise _not_layer_by_layer(model, f"its output has shape {list(getattr(out, 'shape', []))} for tokens of "
                                         f"shape {list(np.shape(tokens))} with layers traced")
    tracers[0].model_output = out
    return tracers


def _not_layer_by_layer(model, why: str) -> BadInput:
    """Layers that return tuples or hand state to the next layer cannot be run one layer at a
    time from recorded arguments: refused, never run wrong (a [B, L, D] output unpacked into
    (h, state) splits along the batch axis without an error)."""
    return BadInput("model", f"{type(model).__module__.rpartition('.')[2]}: {why}; "
                             f"a layer-by-layer run cannot reproduce this model")


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

        mx = mlx_core()
        shape, k = x.shape, inds.shape[-1]
        flat = x.reshape(-1, shape[-1])
        logits = self.logits.reshape(-1, self.logits.shape[-1])
        routed = Routed(inds.reshape(-1, k), weights.reshape(-1, k), mx.softmax(logits.astype(mx.float32), axis=-1))
        cap = experts.capture(self.block, self.fam, flat, k, self.num_experts, self.pair, routed=routed)
        if self.check:
            def reference(xr, rows):
                return self.experts(xr, routed.inds[None, :rows], routed.weights[None, :rows])
            experts.self_check(self.block, self.fam, cap, self.layer, self.where, reference)
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
        kind = LayerMoEHook if not self.family.block else MoEHook
        return kind(self.blocks[i], self.family, i, self.top_k, self.num_experts(i), on_capture, check,
                    self.where, pair)

    def layer_forward(self, i: int, h, tracer: Tracer, on_capture: Callable | None, check: bool,
                      pair: Callable | None = None, states: dict | None = None):
        """Layer i on h with the arguments the model's forward gives it (`states`: the previous
        layer's state outputs it takes, by (layer, index)); a layer returning (h, *state) returns
        that tuple."""
        layer = self.model.layers[i]
        args, kwargs = tracer.bind(states or {})
        if i not in self.blocks:
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
            return layer(h, *args, **kwargs)
        finally:
            layer[self.family.block] = block


class Weights:
    """Reads one decoder layer's tensors (or the ones outside the layers) from a checkpoint's byte
    ranges into a skeleton, and drops them again. Hugging Face-layout tensors go through the
    family's own `sanitize` (per layer); a non-uniform prune's expert-axis tensors keep their
    layer's count."""

    def __init__(self, ckpt: Checkpoint, model, family: Family, where: str):
        from mlx.utils import tree_flatten

        from ..families.loader import fit_layer_counts

        self.ckpt, self.model, self.family, self.where = ckpt, model, family, where
        # a non-uniform prune (apply's config record): MoE layer -> experts it holds
        record = ckpt.config.get("reap_stream") or {}
        self.layer_experts = {int(k): int(v) for k, v in (record.get("layer_experts") or {}).items()}
        fit_layer_counts(model, self.layer_experts, family)
        self.params = {n: (tuple(a.shape), a.dtype) for n, a in tree_flatten(model.parameters())}
        self.prefix = self._layer_prefix()
        self.mlx_layout = set(ckpt.tensors) <= set(self.params)

    def _layer_prefix(self) -> str:
        first = self.model.layers[0]
        for path, module in self.model.named_modules():
            if module is first:
                return path[: -len(".0")] + "."
        raise BadInput(self.where, "cannot locate decoder layers in the mlx_lm model")

    def names_of(self, layer: int | None) -> list[str]:
        """Checkpoint tensors of one decoder layer, or (None) everything outside the layers
        (in either layout: the decoder stack's prefix may differ between them)."""
        def of(name: str) -> int | None:
            m = layer_of(name)
            return None if m is None else int(m.group(1))
        return sorted(n for n in self.ckpt.tensors if of(n) == layer)

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
        renamed = {}
        for n, a in weights.items():
            m = layer_of(n)
            renamed[n[:m.start(1)] + "0" + n[m.end(1):]] = a
        out = self.model.sanitize(renamed)
        src, dst = f"{self.prefix}{layer}.", f"{self.prefix}0."
        return {src + n[len(dst):] if n.startswith(dst) else n: a for n, a in out.items()}

    def drop(self, names: list[str]) -> None:
        """Replace loaded tensors by lazy zeros, which hold no memory."""
        mx = mlx_core()
        self.model.load_weights([(n, mx.zeros(self.params[n][0], self.params[n][1])) for n in names], strict=False)
        mx.clear_cache()
