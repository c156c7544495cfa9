"""How a model is run over calibration tokens: layer by layer with one layer in memory (stream), or
whole (memory), behind one interface.

    runner = open_runner(model, RunOptions(mode="stream"), work_dir)
    chunks = runner.chunks(sequences, max_batch)   # deterministic batches of equal-length sequences
    for layer in runner.run(chunks, on_moe=cb, mask=pruned, stop=None, on_layer_done=commit):
        ...                                         # each layer once it is complete
    logits = runner.logits(chunk)                   # [B, L, V] after the last layer
    runner.close()

cb(layer, chunk, capture) is called for every MoE layer and chunk (families/experts.Capture);
on_layer_done(layer) runs once a layer is complete, which is where callers commit per-layer
results atomically. `mask` ({layer: [expert ids]}) routes as the "masked original"
(families/masking.mask_experts). `start_layer` is where run() starts: a stream run that was killed
resumes at its first unfinished layer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Protocol

from ..families.model import Model
from ..families.table import Family
from .chunks import MODES, Chunk, RunOptions, make_chunks

__all__ = ["MODES", "Chunk", "RunOptions", "Runner", "make_chunks", "open_runner"]


class Runner(Protocol):
    family: Family
    num_layers: int
    moe_layers: list[int]
    start_layer: int

    def chunks(self, sequences, max_batch: int | None = None) -> list[Chunk]: ...

    def run(self, chunks: list[Chunk], on_moe: Callable | None = None, mask: dict[int, list[int]] | None = None,
            stop: int | None = None, on_layer_done: Callable[[int], None] | None = None) -> Iterator[int]: ...

    def logits(self, chunk: Chunk): ...

    def close(self) -> None: ...


def open_runner(model: Model, options: RunOptions, work_dir: Path | None, *, progress: bool = True) -> Runner:
    """The runner of `options.mode` (stream mode spills to `work_dir`)."""
    options.validate()
    if options.mode == "memory":
        from .memory import MemoryRunner
        return MemoryRunner(model, chunk_tokens=options.chunk_tokens, progress=progress,
                            expert_kernel=options.expert_kernel)
    from .stream import StreamRunner
    if work_dir is None:
        raise ValueError("stream mode needs a work dir")
    return StreamRunner(model, work_dir, chunk_tokens=options.chunk_tokens, progress=progress,
                        expert_kernel=options.expert_kernel)
