"""What a run is made of: chunks of calibration sequences, and the run options every command
that runs the model shares (mode, chunk size, sequences per chunk, work dir), validated here once."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import BadInput

# how a model is run: layer by layer with hidden states spilled (stream), or whole in memory
MODES = ("stream", "memory")
# which kernel runs the experts (families/experts.py): the CPU's loop, MLX's gather, or by device
EXPERT_KERNELS = ("auto", "loop", "gather")


@dataclass(frozen=True)
class RunOptions:
    mode: str = "stream"
    chunk_tokens: int = 4096
    sample_batch_size: int | None = None   # None: as many sequences per chunk as chunk_tokens holds
    work_dir: Path | None = None           # None: the command's default
    distributed: bool = False              # must run as ranks of an mlx.launch group (runner/distributed.py)
    expert_kernel: str = "auto"
    max_memory: int | None = None          # bytes the process may hold at its peak (None: no limit)
    expert_chunk_bytes: int | None = None  # bytes of experts per chunk (None: runner.budget's default)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise BadInput("--mode", f"unknown mode {self.mode!r} (choose {', '.join(MODES)})")
        if self.chunk_tokens < 1:
            raise BadInput("--chunk-tokens", f"must be at least 1 (got {self.chunk_tokens})")
        if self.expert_kernel not in EXPERT_KERNELS:
            raise BadInput("--expert-kernel", f"unknown kernel {self.expert_kernel!r} (choose {', '.join(EXPERT_KERNELS)})")
        if self.max_memory is not None and self.max_memory < 1:
            raise BadInput("--max-memory", f"must be a positive size (got {self.max_memory})")
        if self.sample_batch_size is not None and self.sample_batch_size < 1:
            raise BadInput("--sample-batch-size", f"must be at least 1 (got {self.sample_batch_size})")


@dataclass(frozen=True)
class Chunk:
    """A batch of equal-length sequences processed together."""

    index: int
    tokens: np.ndarray   # [B, L] int32
    start: int           # first row of this chunk in the flattened calibration tokens

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)


def make_chunks(sequences: list[np.ndarray], chunk_tokens: int, max_batch: int | None = None) -> list[Chunk]:
    """Consecutive sequences of equal length, grouped up to chunk_tokens tokens and max_batch
    sequences (at least one)."""
    chunks: list[Chunk] = []
    batch: list[np.ndarray] = []
    start = row = 0
    for seq in sequences:
        seq = np.asarray(seq, dtype=np.int32).reshape(-1)
        full = (len(batch) + 1) * len(seq) > chunk_tokens or (max_batch is not None and len(batch) >= max_batch)
        if batch and (len(seq) != len(batch[0]) or full):
            chunks.append(Chunk(len(chunks), np.stack(batch), start))
            start, batch = row, []
        batch.append(seq)
        row += len(seq)
    if batch:
        chunks.append(Chunk(len(chunks), np.stack(batch), start))
    return chunks


_after_chunk: list[Callable[[], None]] = []   # a distributed run's "still working" (runner/distributed)


def report_chunks_to(hook: Callable[[], None] | None) -> None:
    """Call `hook` after every chunk of every pass (None: stop)."""
    _after_chunk[:] = [] if hook is None else [hook]


def chunk_bar(chunks: list[Chunk], desc: str, progress: bool):
    """The chunks, with a tokens progress bar (erased when done) where progress is wanted."""
    from tqdm import tqdm

    bar = tqdm(total=sum(c.num_tokens for c in chunks), desc=desc, unit="tok", unit_scale=True, leave=False,
               disable=None if progress else True)
    for c in chunks:
        yield c
        bar.update(c.num_tokens)
        for hook in _after_chunk:
            hook()
    bar.close()
