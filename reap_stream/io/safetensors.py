"""Safetensors checkpoints as an index of byte ranges: headers parsed and validated, no tensor read.

The validation follows the rules of the Rust `safetensors` crate: header length at most 100 MB and
inside the file, offsets contiguous from 0, each size = prod(shape) * dtype bits / 8, the data buffer
covered exactly, no duplicate keys. Shards are opened read-only.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BadInput, os_error
from .reading import parse_json, read_json_object, regular_file

MAX_HEADER_BYTES = 100_000_000
INDEX_NAME = "model.safetensors.index.json"

# bits per element of every safetensors dtype
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4,
    "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
}
# numpy view of each dtype; bf16 is read as its raw uint16 bits
NUMPY_DTYPE = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "F8_E5M2": np.uint8, "F8_E4M3": np.uint8,
    "F8_E8M0": np.uint8, "I16": np.int16, "U16": np.uint16, "F16": np.float16, "BF16": np.uint16,
    "I32": np.int32, "U32": np.uint32, "F32": np.float32, "I64": np.int64, "U64": np.uint64,
    "F64": np.float64,
}


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: absolute byte range [start, end) of `file`."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class ShardHeader:
    path: Path
    metadata: dict[str, str]
    tensors: dict[str, TensorRef]  # in data order


def read_shard_header(path: Path) -> ShardHeader:
    """Parse and validate one safetensors file's header."""
    path = Path(path)
    size = regular_file(path, "safetensors shard").st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise BadInput(path, f"truncated safetensors file ({size} bytes, no header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise BadInput(path, f"header length {n} exceeds the 100,000,000-byte limit")
            if 8 + n > size:
                raise BadInput(path, f"header length {n} runs past the end of the file ({size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise os_error(e, path, doing="cannot read") from None
    if len(raw) < n:
        raise BadInput(path, f"truncated while reading: header of {n} bytes, {len(raw)} read")
    header = parse_json(raw, path, "safetensors header JSON", unique_keys=True)
    if not isinstance(header, dict):
        raise BadInput(path, "safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise BadInput(path, "__metadata__ must map strings to strings")

    buffer_len = size - 8 - n
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise BadInput(path, f"tensor {name!r}: entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise BadInput(path, f"tensor {name!r}: unknown dtype {dtype!r:.40}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise BadInput(path, f"tensor {name!r}: invalid shape {shape!r:.80}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise BadInput(path, f"tensor {name!r}: invalid data_offsets {offsets!r:.80}")
        entries.append((offsets[0], offsets[1], name, dtype, tuple(shape)))

    entries.sort()
    expected = 0
    tensors: dict[str, TensorRef] = {}
    for begin, end, name, dtype, shape in entries:
        if begin != expected:
            kind = "overlap" if begin < expected else "leave a gap"
            raise BadInput(path, f"tensor {name!r}: data_offsets [{begin}, {end}] {kind} (expected start {expected})")
        if end < begin:
            raise BadInput(path, f"tensor {name!r}: data_offsets end {end} before start {begin}")
        want = math.prod(shape) * DTYPE_BITS[dtype]
        if want % 8 or want // 8 != end - begin:
            raise BadInput(path, f"tensor {name!r}: {end - begin} bytes do not match shape {list(shape)} of {dtype}")
        if end > buffer_len:
            raise BadInput(path, f"tensor {name!r}: data_offsets end {end} past the end of the data ({buffer_len} bytes); file truncated?")
        tensors[name] = TensorRef(name, path, dtype, shape, 8 + n + begin, 8 + n + end)
        expected = end
    if expected != buffer_len:
        raise BadInput(path, f"data buffer is {buffer_len} bytes but tensors cover {expected}")
    return ShardHeader(path, metadata, tensors)


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _name_fault(name: str) -> str | None:
    """Why an index entry's file name is unusable, or None. The rule is about the NAME: relative,
    no `..`, so it stays inside the model directory; where a symbolic link then points (a Hugging
    Face cache snapshot links every file into ../../blobs/) is the user's business."""
    if not name or "\x00" in name:
        return "is empty or holds a NUL byte"
    if any(0xD800 <= ord(c) <= 0xDFFF for c in name):
        return "is not valid Unicode"
    if os.path.isabs(name) or ".." in Path(name).parts:
        return "escapes the model directory"
    return None


@dataclass
class Checkpoint:
    """A model directory: config plus name -> TensorRef for every tensor of every shard."""

    root: Path
    config: dict
    shards: list[ShardHeader]
    tensors: dict[str, TensorRef] = field(default_factory=dict)

    @classmethod
    def open(cls, model_dir: str | Path) -> "Checkpoint":
        root = Path(model_dir)
        if not root.is_dir():
            raise BadInput(root, "not a model directory")
        config_path = root / "config.json"
        config = read_json_object(config_path, "JSON", missing="missing")
        if not isinstance(config.get("model_type"), str):
            raise BadInput(config_path, "no model_type string")

        index_path = root / INDEX_NAME
        weight_map: dict[str, str] | None = None
        if os.path.lexists(index_path):
            weight_map = read_json_object(index_path, "index", unique_keys=True).get("weight_map")
            if not isinstance(weight_map, dict):
                raise BadInput(index_path, "invalid index: weight_map is not an object")
            for name, fname in weight_map.items():
                fault = _name_fault(fname) if isinstance(fname, str) else "is not a file name"
                if fault:
                    raise BadInput(index_path, f"weight_map entry {name!r:.80} -> {fname!r:.80} {fault}")
            files = sorted(set(weight_map.values()))
        else:
            try:
                files = sorted(p.name for p in root.glob("*.safetensors"))
            except OSError as e:
                raise os_error(e, root, doing="cannot list") from None
            if not files:
                raise BadInput(root, "no *.safetensors files and no model.safetensors.index.json")
        for fname in files:  # every name usable before any header is read
            try:
                os.stat(root / fname)
            except FileNotFoundError:
                raise BadInput(index_path if weight_map is not None else root / fname,
                               f"shard {fname} listed in weight_map does not exist") from None
            except OSError as e:
                raise os_error(e, index_path, doing=f"shard {fname!r:.80}") from None
        shards = []
        tensors: dict[str, TensorRef] = {}
        for fname in files:
            path = root / fname
            shard = read_shard_header(path)
            for name, ref in shard.tensors.items():
                if name in tensors:
                    raise BadInput(path, f"tensor {name!r} also stored in {tensors[name].file.name}")
                if weight_map is not None and weight_map.get(name) != fname:
                    raise BadInput(index_path, f"tensor {name!r} is in {fname} but weight_map says {weight_map.get(name)!r}")
                tensors[name] = ref
            shards.append(shard)
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(tensors))
            if missing:
                raise BadInput(index_path, f"weight_map names {missing[0]!r} but {weight_map[missing[0]]} does not hold it")
        return cls(root, config, shards, tensors)

    @property
    def model_type(self) -> str:
        return self.config["model_type"]


def read_array(ref: TensorRef) -> np.ndarray:
    """Read-only memmap view of a tensor (bf16 as uint16 bits, F8/F4 as raw bytes)."""
    if ref.dtype == "F4" or ref.dtype.startswith("F6"):
        return np.memmap(ref.file, np.uint8, "r", ref.start, (ref.nbytes,))
    dt = np.dtype(NUMPY_DTYPE[ref.dtype])
    if ref.nbytes == 0:
        return np.zeros(ref.shape, dt)
    return np.memmap(ref.file, dt, "r", ref.start, ref.shape)


def to_float32(ref: TensorRef) -> np.ndarray:
    """A tensor as float32, upcasting bf16 from its bits without a second full copy."""
    arr = read_array(ref)
    if ref.dtype == "BF16":
        return (np.asarray(arr, np.uint32) << 16).view(np.float32)
    return np.asarray(arr, np.float32)


def read_rows(ref: TensorRef, lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray:
    """Rows [lo, hi) of axis 0 of a tensor, read with pread into a fresh array, or into `out` (a
    C-contiguous array of that many bytes) — no map: mapped pages count in the process's RSS next
    to their copies. bf16 comes back as its uint16 bits."""
    rows = ref.shape[0] if ref.shape else 1
    if not 0 <= lo <= hi <= rows or rows == 0:
        raise ValueError(f"rows [{lo}, {hi}) of {ref.name} ({rows} rows)")
    stride = ref.nbytes // rows
    dt = np.dtype(NUMPY_DTYPE.get(ref.dtype, np.uint8))
    shape = (hi - lo,) + tuple(ref.shape[1:]) if ref.shape else ()
    if ref.dtype == "F4" or ref.dtype.startswith("F6"):
        shape = ((hi - lo) * stride,)
    if out is None:
        out = np.empty(shape, dt)
    elif out.nbytes != (hi - lo) * stride or not out.flags.c_contiguous:
        raise ValueError(f"rows [{lo}, {hi}) of {ref.name} do not fit the array given")
    view = memoryview(out.reshape(-1).view(np.uint8)) if out.size else memoryview(b"")
    try:
        fd = os.open(ref.file, os.O_RDONLY)
    except OSError as e:
        raise BadInput(ref.file, f"cannot read: {e.strerror}") from None
    try:
        pos, start = 0, ref.start + lo * stride
        while pos < len(view):
            n = os.preadv(fd, [view[pos:]], start + pos)
            if n <= 0:
                raise BadInput(ref.file, f"unexpected end of file reading tensor {ref.name!r}")
            pos += n
    finally:
        os.close(fd)
    return out


def read_row_set(ref: TensorRef, ids: np.ndarray) -> np.ndarray:
    """Rows `ids` (ascending, unique) of axis 0, consecutive ids read as one range."""
    ids = np.asarray(ids, dtype=np.int64)
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    parts = [read_rows(ref, int(run[0]), int(run[-1]) + 1) for run in np.split(ids, breaks) if len(run)]
    return np.concatenate(parts) if parts else read_rows(ref, 0, 0)
