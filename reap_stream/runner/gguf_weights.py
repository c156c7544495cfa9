"""A GGUF model in the streaming runner: the mlx_lm skeleton built from the config rebuilt from the
GGUF's metadata, filled one layer at a time from the GGUF's byte ranges (families/gguf_source),
dequantised to float32; a layer's routed experts, where the family's may be, read a chunk of
experts at a time (gguf_source.GGUFExperts). Same interface as skeleton.Weights, so both runners
take either.
"""
from __future__ import annotations

import contextlib
from typing import Callable

from ..blas import mlx_core
from ..families.expert_source import by_range
from ..families.gguf_source import GGUFExperts, GGUFSource
from ..families.model import Model
from .skeleton import layer_prefix, model_from_config


def gguf_skeleton(model: Model):
    """The never-evaluated mlx_lm model of a GGUF (float32, as its weights are dequantised)."""
    return model_from_config(model.config, model.where)


class GGUFWeights:
    """Reads one decoder layer's parameters (or those outside the layers) from a GGUF into the
    skeleton, and drops them again. Every parameter is matched to its GGUF tensor, shape and
    ggml type checked, before the first layer runs."""

    def __init__(self, model: Model, skeleton, where: str):
        from mlx.utils import tree_flatten

        self.model, self.where, self.family = skeleton, where, model.family
        self.params = {n: (tuple(a.shape), a.dtype) for n, a in tree_flatten(skeleton.parameters())}
        self.prefix = layer_prefix(skeleton, where)
        tensors = {t.name: t for p in model.gguf_parts for t in p.tensors}
        blocks = int(model.gguf_parts[0].get(f"{model.gguf_arch}.block_count"))
        self.source = GGUFSource(model.gguf_arch, model.family, model.config, tensors,
                                 {n: shape for n, (shape, _) in self.params.items()}, blocks, where)

    def names_of(self, layer: int | None) -> list[str]:
        if layer is None:
            return sorted(n for n in self.params if not n.startswith(self.prefix))
        p = f"{self.prefix}{layer}."
        return sorted(n for n in self.params if n.startswith(p))

    def experts(self, layer: int) -> GGUFExperts | None:
        """The source of a layer's routed experts read by expert range (None: the family's or the
        file's experts are not served that way, and the layer loads whole)."""
        if not by_range(self.family):
            return None
        stack = f"{self.prefix}{layer}.{self.family.block}.{self.family.stacked}."
        if any(dtype != mlx_core().float32 for n, (_, dtype) in self.params.items() if n.startswith(stack)):
            return None
        return self.source.stack(stack)

    def embedding_rows(self, token_ids) -> contextlib.AbstractContextManager[set[str]]:
        """The embedding table is read whole from a GGUF (dequantised): nothing held by rows."""
        return contextlib.nullcontext(set())

    def head_names(self) -> list[str]:
        return self.names_of(None)

    def load(self, layer: int | None, skip: Callable[[str], bool] = lambda name: False,
             experts: GGUFExperts | None = None) -> list[str]:
        """Read one layer's (or the non-layer) parameters into the skeleton; returns their names.
        With `experts` (the layer's expert source), its routed experts are left to be read by range."""
        mx = mlx_core()
        routed = experts.params if experts is not None else set()
        names = [n for n in self.names_of(layer) if not skip(n) and n not in routed]
        weights = []
        for n in names:
            arr = self.source.array(n)
            weights.append((n, mx.array(arr).astype(self.params[n][1])))
            del arr
        self.model.load_weights(weights, strict=False)
        return names

    def drop(self, names: list[str]) -> None:
        """Replace loaded parameters by lazy zeros, which hold no memory."""
        mx = mlx_core()
        self.model.load_weights([(n, mx.zeros(self.params[n][0], self.params[n][1])) for n in names], strict=False)
        mx.clear_cache()
