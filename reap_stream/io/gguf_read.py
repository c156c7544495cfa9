"""GGUF tensor data as numpy arrays: read by byte range (a whole tensor or a run of its outermost
slices, e.g. a few experts) and dequantised with gguf-py's quants.

Every block type gguf-py can dequantise is read (F32, F16, BF16, Q4_0…Q8_0, K-quants, IQ types,
TQ, MXFP4, NVFP4) to float32; integer tensors are read as their integers. A type gguf-py cannot
dequantise is refused with one line naming the tensor (`check_readable`), before anything runs.
Nothing beyond the requested byte range is read.
"""
from __future__ import annotations

import os

import numpy as np
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

from ..errors import BadInput
from .gguf import TensorInfo

_INTEGERS = {T.I8: np.int8, T.I16: np.int16, T.I32: np.int32, T.I64: np.int64, T.F64: np.float64}


def readable_types() -> list[str]:
    """Names of the ggml types this reader turns into arrays."""
    known = {T.F32, T.F16, *quants._type_traits, *_INTEGERS}
    return [t.name for t in T if t in known]


def check_readable(t: TensorInfo) -> None:
    if T(t.ggml_type).name not in readable_types():
        raise BadInput(t.file, f"tensor {t.name!r}: ggml type {T(t.ggml_type).name} cannot be dequantised by "
                               f"gguf-py's quants (readable: {', '.join(readable_types())})")


def _read(path, start: int, n: int) -> np.ndarray:
    buf = np.empty(n, np.uint8)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        done = 0
        while done < n:
            got = os.preadv(f.fileno(), [view[done:]], start + done)
            if got <= 0:
                raise BadInput(path, f"unexpected end of file reading bytes [{start}, {start + n})")
            done += got
    return buf


def _decode(t: TensorInfo, raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    qtype = T(t.ggml_type)
    if qtype in _INTEGERS:
        return raw.view(_INTEGERS[qtype]).reshape(shape)
    block, type_size = GGML_QUANT_SIZES[qtype]
    return quants.dequantize(raw.reshape(-1, t.ne[0] // block * type_size), qtype).reshape(shape)


def read_tensor(t: TensorInfo) -> np.ndarray:
    """The whole tensor as a numpy array of shape reversed(ne): float32, or its integers."""
    check_readable(t)
    return _decode(t, _read(t.file, t.start, t.nbytes), tuple(reversed(t.ne)))


def read_slices(t: TensorInfo, first: int, count: int) -> np.ndarray:
    """Outermost slices [first, first + count) of a tensor of 2 dims or more (a run of experts of
    an expert stack): one byte range, shape (count, *reversed(ne[:-1]))."""
    check_readable(t)
    if len(t.ne) < 2 or not (0 <= first and 0 <= count and first + count <= t.ne[-1]):
        raise ValueError(f"slices [{first}, {first + count}) of {t.name} {list(t.ne)}")
    stride = t.outer_stride
    raw = _read(t.file, t.start + first * stride, count * stride)
    return _decode(t, raw, (count, *reversed(t.ne[:-1])))
