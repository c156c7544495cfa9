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

import contextlib
from typing import Callable, Iterator

import numpy as np

from ..blas import mlx_core
from ..errors import BadInput
from ..families.expert_source import MX_DTYPES, CheckpointExperts, checkpoint_experts
from ..families.table import Family, classify
from ..io.safetensors import Checkpoint, TensorRef, read_row_set, read_rows
from .cpu import float32_attention, float32_linears


class _ShapeProxy:
    """What mlx_lm's quantisation inference reads of a weight: shape and dtype."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, dtype


def to_mx(ref: TensorRef):
    """An mx.array holding exactly the bytes of one tensor (read from its byte range only)."""
    mx = mlx_core()
    if ref.dtype not in MX_DTYPES:
        raise BadInput(ref.file, f"tensor {ref.name!r}: dtype {ref.dtype} is not supported by the streaming runner")
    # read, not mapped: mapped pages count in RSS next to their copies (a map kept for a whole
    # layer measured +43 MiB peak on an h512 / 64-expert model; an embedding table counts twice)
    arr = read_rows(ref, 0, ref.shape[0] if ref.shape else 1).reshape(ref.shape)
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
        proxies = {n: _ShapeProxy(r.shape, getattr(mx, MX_DTYPES.get(r.dtype, "uint8")))
                   for n, r in ckpt.tensors.items()}

        def predicate(path, module):
            if path in quant:
                return quant[path]
            if not hasattr(module, "to_quantized") or f"{path}.scales" not in proxies:
                return False
            return infer_quant_config(path, module, proxies)

        nn.quantize(model, group_size=quant["group_size"], bits=quant["bits"],
                    mode=quant.get("mode", "affine"), class_predicate=predicate)
    float32_linears(model)
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
        cap = experts.capture(self.block, self.fam, flat, self.top_k, self.num_experts, self.pair, self.plan,
                              check=self.check)
        if self.check:
            self_check(self.block, self.fam, cap, self.layer, self.where)
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
        self.sources: dict[int, CheckpointExperts] = {}

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self.blocks)

    def num_experts(self, layer: int) -> int:
        from ..families.masking import router_experts
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

    def hook(self, i: int, on_capture: Callable | None, check: bool, pair: Callable | None = None) -> MoEHook:
        from ..families.experts import ExpertPlan

        plan = ExpertPlan(self.sources.get(i), self.chunk_bytes, self.kernel)
        return MoEHook(self.blocks[i], self.family, i, self.top_k, self.num_experts(i), on_capture, check,
                       self.where, pair, plan)

    def layer_forward(self, i: int, h, tracer: Tracer, on_capture: Callable | None, check: bool,
                      pair: Callable | None = None):
        layer = self.model.layers[i]
        if i not in self.blocks:
            with float32_attention():
                return layer(h, *tracer.args, **tracer.kwargs)
        block = self.blocks[i]
        hook = self.hook(i, on_capture, check, pair)
        # decoder layers call self.<block>(x); swapping the dict entry keeps the rest mlx_lm's code
        layer[self.family.block] = hook
        try:
            with float32_attention():
                return layer(h, *tracer.args, **tracer.kwargs)
        finally:
            layer[self.family.block] = block


class _RowLookup:
    """Stands in for a token embedding that holds only rows `ids`: maps token ids to them."""

    def __init__(self, embedding, ids: np.ndarray):
        self.embedding, self.ids = embedding, ids

    def __call__(self, x):
        mx = mlx_core()
        return self.embedding(mx.array(np.searchsorted(self.ids, np.array(x)).astype(np.int32)))

    def __getattr__(self, name: str):
        # e.g. a tied head's as_linear, which the traced forward builds (lazily, never evaluated)
        return getattr(self.embedding, name)


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
        first = self.model.layers[0]
        for path, module in self.model.named_modules():
            if module is first:
                return path[: -len(".0")] + "."
        raise BadInput(self.where, "cannot locate decoder layers in the mlx_lm model")

    def names_of(self, layer: int | None) -> list[str]:
        """Checkpoint tensors of one decoder layer, or (None) everything outside the layers."""
        if layer is None:
            return sorted(n for n in self.ckpt.tensors if not n.startswith(self.prefix))
        p = f"{self.prefix}{layer}."
        return sorted(n for n in self.ckpt.tensors if n.startswith(p))

    def experts(self, layer: int) -> CheckpointExperts | None:
        """The byte-range source of a layer's routed experts (None: the layout needs the family's
        sanitize, and the layer is read whole)."""
        return checkpoint_experts(self.ckpt, self.family, layer, self.prefix, self.params)

    def load(self, layer: int | None, skip: Callable[[str], bool] = lambda name: False,
             experts: CheckpointExperts | None = None) -> list[str]:
        """Read one layer's (or the non-layer) tensors into the skeleton; returns parameter names.
        With `experts` (the layer's expert source), its routed experts are left to be read by range."""
        stack = f"{self.prefix}{layer}.{self.family.block}.{self.family.stacked}."
        if experts is not None:
            routed = {id(r) for p in experts.refs.values() for ref in p.values()
                      for r in (ref if isinstance(ref, list) else [ref])}
            skip_first = skip
            skip = lambda n: skip_first(n) or id(self.ckpt.tensors[n]) in routed  # noqa: E731
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
            want = [n for n in table if n.startswith(f"{self.prefix}{layer}.")
                    and not (experts is not None and n.startswith(stack))]
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

    def _embedding(self) -> tuple[str, object, dict[str, str]]:
        """(module path, module, {parameter: checkpoint tensor}) of the token embedding; no names
        where it is not one plain (or quantised) table stored under its own name."""
        mx = mlx_core()
        import mlx.nn as nn

        found = [(path, m) for path, m in self.model.named_modules()
                 if type(m) in (nn.Embedding, nn.QuantizedEmbedding) and not path.startswith(self.prefix)]
        if len(found) != 1:
            return "", None, {}
        path, module = found[0]
        names = {k: f"{path}.{k}" for k in module if isinstance(module[k], mx.array)}
        return (path, module, names) if all(n in self.ckpt.tensors for n in names.values()) else ("", None, {})

    def head_names(self) -> list[str]:
        """The tensors outside the layers that the head's logits need: all but the token
        embedding, unless the head is the embedding (tied)."""
        table = set(self._embedding()[2].values())
        rest = self.names_of(None)
        untied = any(n not in table and n.endswith(".weight") and n.split(".")[0] in ("lm_head", "output")
                     for n in rest)
        return [n for n in rest if not (untied and n in table)]

    @contextlib.contextmanager
    def embedding_rows(self, token_ids: np.ndarray) -> Iterator[set[str]]:
        """While inside, the model's token embedding holds only the rows of `token_ids` (read by
        range) and maps ids to them itself: the table of a large vocabulary (0.6 GB for
        Qwen3-30B in bf16) is never read whole to embed a few thousand tokens. Yields the names of
        the tensors it holds: none, and nothing changed, where the embedding is not a plain table
        stored under its own name."""
        mx = mlx_core()
        path, module, names = self._embedding()
        if not names:
            yield set()
            return
        ids = np.unique(np.asarray(token_ids, dtype=np.int64))
        vocab = self.ckpt.tensors[names["weight"]].shape[0]
        if len(ids) and (ids[0] < 0 or ids[-1] >= vocab):
            raise BadInput(self.where, f"token id {int(ids[-1] if ids[-1] >= vocab else ids[0])} is outside the "
                                       f"embedding table ({vocab} rows)")
        saved = {k: module[k] for k in names}
        for k, name in names.items():
            ref = self.ckpt.tensors[name]
            rows = read_row_set(ref, ids)
            module[k] = mx.array(rows).view(mx.bfloat16) if ref.dtype == "BF16" else mx.array(rows)
        parent_path, _, attr = path.rpartition(".")
        parent = self.model if not parent_path else dict(self.model.named_modules())[parent_path]
        parent[attr] = _RowLookup(module, ids)
        try:
            yield set(names.values())
        finally:
            parent[attr] = module
            for k, a in saved.items():
                module[k] = a
            mx.clear_cache()

    def drop(self, names: list[str]) -> None:
        """Replace loaded tensors by lazy zeros, which hold no memory."""
        mx = mlx_core()
        self.model.load_weights([(n, mx.zeros(self.params[n][0], self.params[n][1])) for n in names], strict=False)
        mx.clear_cache()
