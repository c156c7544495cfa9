"""How long a stream run takes at the least on this machine: each layer's bytes read at the disk's
rate plus its matmul FLOPs at the BLAS's GEMM rate, both measured here in a second or two.

The same bound is what `tools/bench_scale.py` holds collect against ("within 2x of the bound").
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .budget import Shapes

_READ_SAMPLE = 256 << 20


@dataclass(frozen=True)
class Rates:
    read_bytes_per_s: float
    gemm_flops_per_s: float
    read_source: str   # what was read to measure the disk


def gemm_rate(hidden: int = 2048, width: int = 768, rows: int = 512, repeats: int = 5, trials: int = 3) -> float:
    """FLOP/s of float32 matmuls shaped like one expert's on a chunk's rows (the BLAS in use): the
    best of `trials` timings of `repeats` matmuls, so that another job's burst is not taken for
    this machine's rate (a higher rate is a lower, stricter bound)."""
    from ..blas import mlx_core

    mx = mlx_core()
    x = mx.random.normal((rows, hidden))
    w = mx.random.normal((width, hidden))
    mx.eval(x, w, x @ w.T)
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            mx.eval(x @ w.T)
        best = min(best, time.perf_counter() - start)
    return repeats * 2.0 * rows * hidden * width / best


def read_rate(files: list[Path]) -> tuple[float, str]:
    """Bytes/s of a cold sequential read: up to 256 MiB of the largest of `files`, dropped from
    the page cache first (posix_fadvise, no privileges needed); without files, of a temporary file
    written, synced and dropped the same way."""
    tmp = None
    if files:
        path = max(files, key=lambda p: p.stat().st_size)
        what = str(path)
    else:
        fd, name = tempfile.mkstemp(prefix="reap-estimate-")
        tmp = path = Path(name)
        with os.fdopen(fd, "wb") as f:
            block = os.urandom(8 << 20)
            for _ in range(_READ_SAMPLE // len(block)):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        what = f"a temporary file in {path.parent}"
    try:
        size = min(path.stat().st_size, _READ_SAMPLE)
        fd = os.open(path, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):
                os.fsync(fd)   # dirty pages (a file just written) cannot be dropped
                os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)
            buf = bytearray(8 << 20)
            view = memoryview(buf)
            start, pos = time.perf_counter(), 0
            while pos < size and (n := os.preadv(fd, [view[: min(len(buf), size - pos)]], pos)) > 0:
                pos += n
            seconds = time.perf_counter() - start
        finally:
            os.close(fd)
    finally:
        if tmp is not None:
            tmp.unlink()
    return pos / max(seconds, 1e-9), what


def measure(files: list[Path]) -> Rates:
    rate, what = read_rate(files)
    return Rates(rate, gemm_rate(), what)


def layer_flops(s: Shapes, layer: int, tokens: int, seq_len: int) -> float:
    """Matmul FLOPs of one layer over `tokens` tokens (in sequences of seq_len): every matrix a
    token meets, its routed experts' (top-k), and attention's scores and weighted values."""
    batch = max(tokens // max(seq_len, 1), 1)
    flops = 2.0 * tokens * s.dense_params.get(layer, 0)
    if layer in s.expert_bytes:
        flops += 2.0 * tokens * s.top_k * s.expert_params
    flops += 4.0 * batch * s.heads * seq_len * seq_len * s.head_dim
    return flops


def bound_seconds(s: Shapes, tokens: int, seq_len: int, rates: Rates) -> dict:
    """The read + compute bound of a stream run: per layer and in total."""
    per_layer = {}
    layer_bytes, expert_bytes = s.stored()   # what is read from disk (a GGUF's quantised bytes)
    for i in layer_bytes:
        read = layer_bytes[i] + s.experts.get(i, 0) * expert_bytes.get(i, 0)
        per_layer[i] = read / rates.read_bytes_per_s + layer_flops(s, i, tokens, seq_len) / rates.gemm_flops_per_s
    return {"per_layer_s": per_layer, "total_s": sum(per_layer.values())}
