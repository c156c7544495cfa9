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

import dataclasses

from ..errors import BadInput
from ..families.model import Model
from ..procstats import return_freed_memory
from ..families.table import Family
from .budget import MAX_EXPERT_CHUNK, checkpoint_shapes, fit, gguf_shapes, whole_model_peak
from .chunks import MODES, Chunk, RunOptions, make_chunks

__all__ = ["MODES", "Chunk", "RunOptions", "Runner", "make_chunks", "open_runner", "fit_memory"]


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
    return_freed_memory()  # keep the RSS what the arrays alive make it (runner.budget)
    if options.mode == "memory":
        from .memory import MemoryRunner
        return MemoryRunner(model, chunk_tokens=options.chunk_tokens, progress=progress,
                            expert_kernel=options.expert_kernel)
    from .stream import StreamRunner
    if work_dir is None:
        raise ValueError("stream mode needs a work dir")
    return StreamRunner(model, work_dir, chunk_tokens=options.chunk_tokens, progress=progress,
                        expert_chunk_bytes=options.expert_chunk_bytes or MAX_EXPERT_CHUNK,
                        expert_kernel=options.expert_kernel)


def fit_memory(model: Model, options: RunOptions, sequences, *, logits: bool = False) -> RunOptions:
    """`options` with tokens per chunk and bytes of experts per chunk chosen so the run's predicted
    peak RSS stays under options.max_memory (runner.budget); unchanged without a limit. Refuses,
    naming the least that is needed, when one sequence and one expert do not fit (or, in memory
    mode, the whole model). Deterministic: the same model, tokens and options give the same
    chunking, so a resumed run continues with the one it started with."""
    options.validate()
    if options.max_memory is None:
        return options
    import numpy as np

    shapes = gguf_shapes(model) if model.is_gguf else \
        checkpoint_shapes(model.require_checkpoint("--max-memory"), model.family, model.structure.top_k)
    seq_len = max((len(s) for s in sequences), default=1)
    if options.mode == "memory":
        need = whole_model_peak(shapes, min(options.chunk_tokens, max(seq_len, 1)), seq_len)
        if need > options.max_memory:
            raise BadInput("--max-memory", f"memory mode holds the whole model: it needs at least "
                                           f"{need / 1e9:.2f} GB (use --mode stream)")
        return options
    unique = len(np.unique(np.concatenate([np.asarray(s).reshape(-1) for s in sequences]))) if sequences else 1
    total = sum(len(s) for s in sequences)
    from ..families.expert_source import read_by_range

    c = fit(shapes, options.max_memory, max(min(options.chunk_tokens, total), seq_len), seq_len,
            whole_layers=not read_by_range(model),
            unique_tokens=unique, logits=logits)
    return dataclasses.replace(options, chunk_tokens=min(options.chunk_tokens, c.tokens), expert_chunk_bytes=c.expert_bytes)
