"""One decoder layer's tensors read from a safetensors checkpoint's byte ranges into a skeleton
(runner/skeleton.py) and dropped again; the token embedding read as the rows a calibration uses."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import numpy as np

from ..blas import mlx_core
from ..errors import BadInput
from ..families.expert_source import MX_DTYPES, CheckpointExperts, checkpoint_experts
from ..families.table import Family, classify, layer_of
from ..io.safetensors import Checkpoint, TensorRef, read_row_set, read_rows
from .skeleton import layer_prefix


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
        return layer_prefix(self.model, self.where)

    def names_of(self, layer: int | None) -> list[str]:
        """Checkpoint tensors of one decoder layer, or (None) everything outside the layers
        (in either layout: the decoder stack's prefix may differ between them)."""
        def of(name: str) -> int | None:
            m = layer_of(name)
            return None if m is None else int(m.group(1))
        return sorted(n for n in self.ckpt.tensors if of(n) == layer)

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
        renamed = {}
        for n, a in weights.items():
            m = layer_of(n)
            renamed[n[:m.start(1)] + "0" + n[m.end(1):]] = a
        out = self.model.sanitize(renamed)
        src, dst = f"{self.prefix}{layer}.", f"{self.prefix}0."
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
