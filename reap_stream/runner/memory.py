"""The whole model in memory, chunk-major: the parity and speed baseline of the streaming runner.

mlx_lm's own loader builds the model (families/loader for non-uniform prunes); each chunk runs
through every layer with the same MoE hooks as stream mode, so both give the same telemetry.
"""
from __future__ import annotations

from typing import Callable, Iterator

from ..blas import mlx_core
from ..families.loader import load_pruned_model
from ..families.masking import mask_experts
from ..families.model import Model
from .chunks import Chunk, chunk_bar
from .lanes import lanes_pair
from .cpu import float32_linears
from .skeleton import Forward, Runs, open_skeleton
from .trace import split_outputs, trace_layers
from .stream import MoECallback


class MemoryRunner(Runs):
    """Same interface as StreamRunner; layers are all complete when the last chunk has run."""

    start_layer = 0

    def __init__(self, model: Model, chunk_tokens: int = 4096, progress: bool = True, expert_kernel: str = "auto"):
        mlx_core()
        if model.is_gguf:
            self.model, weights = open_skeleton(model)
            for layer in [None, *range(len(self.model.layers))]:
                weights.load(layer)
        else:
            self.model, _ = load_pruned_model(model.require_checkpoint("running the model").root)
            float32_linears(self.model)  # as the stream runner's skeleton computes
        self.fwd = Forward(self.model, model.family, model.structure.top_k, model.where, kernel=expert_kernel)
        self.chunk_tokens = int(chunk_tokens)
        self.progress = progress
        self._final: dict[int, object] = {}   # chunk index -> final hidden state

    def run(self, chunks: list[Chunk], on_moe: MoECallback | None = None,
            mask: dict[int, list[int]] | None = None, stop: int | None = None,
            on_layer_done: Callable[[int], None] | None = None) -> Iterator[int]:
        """Every chunk through layers 0..stop-1, then on_layer_done and a yield for each layer."""
        mx = mlx_core()
        if mask:
            mask_experts(self.model, {i: ids for i, ids in mask.items() if ids}, self.family)
        stop = self.num_layers if stop is None else stop
        for c in chunk_bar(chunks, "chunks", self.progress):
            tracers = trace_layers(self.model, c.tokens, family=self.family)
            h = tracers[0].x
            state: tuple = ()
            for i in range(stop):
                cb = None if on_moe is None else (lambda cap, c=c, i=i: on_moe(i, c, cap))
                states = {(s.layer, s.index): state[s.index - 1] for s in tracers[i].needs}
                h = self.fwd.layer_forward(i, h, tracers[i], cb, c.index == 0, lanes_pair, states)  # as in stream mode
                h, state = split_outputs(self.family, h)
                mx.eval(h)
            self._final[c.index] = h
        for i in range(stop):
            if on_layer_done is not None:
                on_layer_done(i)
            yield i

    def logits(self, chunk: Chunk):
        out = trace_layers(self.model, chunk.tokens, final=self._final[chunk.index],
                           family=self.family)[0].model_output
        mlx_core().eval(out)
        return out

    def close(self) -> None:
        self._final.clear()
