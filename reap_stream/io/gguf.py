"""GGUF files as an index of byte ranges: header parsed and validated, no tensor byte read.

The parser is our own so that every fault (bad magic, truncation, absurd counts or string
lengths, unknown types, misaligned or overlapping data) is a BadInput naming the file, never a
MemoryError or a numpy exception. It applies the structural rules llama.cpp's loader applies
(gguf.cpp): versions 2-3, unique keys and tensor names, at most 4 dims, ne0 a multiple of the
block size, `general.alignment` a power of two stored as u32, data offsets aligned and inside the
file. Each metadata entry keeps its raw encoded bytes so an unchanged entry is copied verbatim.

The writer half is io/gguf_write.py.
"""
from __future__ import annotations

import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

from ..errors import BadInput, os_error
from .reading import regular_file

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_NAME = 64          # llama.cpp's GGML_MAX_NAME, terminator included
SUPPORTED_VERSIONS = (2, 3)


class VType(IntEnum):
    """GGUF metadata value types (the numbers are the file format's)."""
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_SCALAR = {VType.UINT8: "B", VType.INT8: "b", VType.UINT16: "H", VType.INT16: "h",
           VType.UINT32: "I", VType.INT32: "i", VType.FLOAT32: "f", VType.BOOL: "?",
           VType.UINT64: "Q", VType.INT64: "q", VType.FLOAT64: "d"}
_SCALAR_SIZE = {t: struct.calcsize("<" + c) for t, c in _SCALAR.items()}
_MIN_VALUE_SIZE = {**_SCALAR_SIZE, VType.STRING: 8}
# arrays this long are validated and copied raw, not decoded (tokenizer vocabularies)
_DECODE_LIMIT = 4096
# sanity limits far above any real model (vocabularies ~300k entries, templates ~100 KiB); they keep
# a corrupt count or length that happens to fit in a 400 GB file from looping or allocating for hours
MAX_STRING = 256 << 20
MAX_ARRAY = 1 << 26
MAX_TENSORS = 1 << 24
_MIN_KV_BYTES = 8 + 4 + 1          # empty key, type, a one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8


@dataclass(frozen=True)
class KV:
    key: str
    vtype: VType
    value: object          # scalar, str, list (short arrays) or None (long arrays)
    raw: bytes             # the whole encoded entry: key, type, value


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]    # llama.cpp order: ne[0] is the innermost (contiguous) dimension
    ggml_type: int
    offset: int            # relative to the data section
    nbytes: int
    file: Path
    start: int             # absolute byte offset in `file`

    @property
    def outer_stride(self) -> int:
        """Bytes of one slice along the outermost dimension (one expert of an expert tensor)."""
        return self.nbytes // self.ne[-1] if self.ne[-1] else 0


@dataclass
class GGUFFile:
    path: Path
    version: int
    alignment: int
    kvs: dict[str, KV]             # in file order
    tensors: list[TensorInfo]      # in tensor-info order
    data_offset: int
    size: int

    def get(self, key: str, default: Any = None) -> Any:
        kv = self.kvs.get(key)
        return default if kv is None else kv.value


def tensor_nbytes(ne: tuple[int, ...], ggml_type: int) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    return math.prod(ne) // block * type_size


def align(n: int, alignment: int) -> int:
    return n + (-n % alignment)


# ---------------------------------------------------------------- reading

def is_gguf(path: str | Path) -> bool:
    """True for a regular file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


class _Cursor:
    """Bounds-checked little-endian reads over a mapped file; every fault names the file."""

    def __init__(self, buf, path: Path):
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def fail(self, what: str) -> BadInput:
        return BadInput(self.path, what)

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"truncated file: {what} at byte {self.pos} needs {n} bytes, "
                            f"{self.size - self.pos} left")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize("<" + fmt)
        self.need(n, what)
        v = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return v[0] if len(v) == 1 else v

    def string(self, what: str, limit: int = MAX_STRING) -> str:
        n = self.unpack("Q", f"length of {what}")
        if n > self.size - self.pos:
            raise self.fail(f"{what}: string length {n} exceeds the file ({self.size - self.pos} bytes left)")
        if n > limit:
            raise self.fail(f"{what}: string length {n} exceeds the limit of {limit} bytes")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what}: string is not valid UTF-8") from None


def _vtype(cur: _Cursor, code: int, what: str) -> VType:
    try:
        return VType(code)
    except ValueError:
        raise cur.fail(f"{what}: unknown metadata value type {code}") from None


def _read_value(cur: _Cursor, vt: VType, what: str):
    if vt == VType.STRING:
        return cur.string(what)
    if vt != VType.ARRAY:
        return cur.unpack(_SCALAR[vt], what)
    et = _vtype(cur, cur.unpack("I", f"{what} element type"), what)
    if et == VType.ARRAY:
        raise cur.fail(f"{what}: nested arrays are not supported")
    count = cur.unpack("Q", f"{what} element count")
    if count * _MIN_VALUE_SIZE[et] > cur.size - cur.pos:
        raise cur.fail(f"{what}: array of {count} elements cannot fit in the file "
                       f"({cur.size - cur.pos} bytes left)")
    if count > MAX_ARRAY:
        raise cur.fail(f"{what}: array of {count} elements exceeds the limit of {MAX_ARRAY}")
    if et == VType.STRING:
        if count > _DECODE_LIMIT:   # validated, not kept
            for i in range(count):
                cur.string(f"{what}[{i}]")
            return None
        return [cur.string(f"{what}[{i}]") for i in range(count)]
    n = count * _SCALAR_SIZE[et]
    cur.need(n, what)
    items = None
    if count <= _DECODE_LIMIT:
        items = list(struct.unpack_from(f"<{count}{_SCALAR[et]}", cur.buf, cur.pos))
    cur.pos += n
    return items


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse and validate one GGUF file's header (metadata + tensor infos)."""
    path = Path(path)
    regular_file(path, "GGUF file")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise os_error(e, path, doing="cannot open") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < 4:
            raise BadInput(path, f"not a GGUF file (only {size} bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(memoryview(buf), path, size)


def _parse(buf, path: Path, size: int) -> GGUFFile:
    cur = _Cursor(buf, path)
    try:
        return _parse_cursor(cur, path, size)
    finally:
        buf.release()


def _parse_cursor(cur: _Cursor, path: Path, size: int) -> GGUFFile:
    if bytes(cur.buf[:4]) != MAGIC:
        raise cur.fail(f"bad magic {bytes(cur.buf[:4])!r}: not a GGUF file")
    cur.pos = 4
    version = cur.unpack("I", "version")
    if version not in SUPPORTED_VERSIONS:
        raise cur.fail(f"GGUF version {version} is not supported (supported: 2, 3)")
    n_tensors, n_kv = cur.unpack("QQ", "tensor and metadata counts")
    if n_kv * _MIN_KV_BYTES > size - cur.pos:
        raise cur.fail(f"metadata count {n_kv} cannot fit in the file")
    if n_tensors * _MIN_TENSOR_INFO_BYTES > size - cur.pos or n_tensors > MAX_TENSORS:
        raise cur.fail(f"tensor count {n_tensors} cannot fit in the file")

    kvs: dict[str, KV] = {}
    for i in range(n_kv):
        start = cur.pos
        key = cur.string(f"metadata key #{i}", limit=1 << 16)
        if key in kvs:
            raise cur.fail(f"duplicate metadata key {key!r}")
        vt = _vtype(cur, cur.unpack("I", f"type of {key!r}"), f"metadata {key!r}")
        value = _read_value(cur, vt, f"metadata {key!r}")
        kvs[key] = KV(key, vt, value, bytes(cur.buf[start:cur.pos]))

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in kvs:
        kv = kvs["general.alignment"]
        if kv.vtype != VType.UINT32 or kv.value == 0 or kv.value & (kv.value - 1):
            raise cur.fail(f"general.alignment must be a power of two stored as u32, got {kv.value!r}")
        alignment = kv.value

    infos = []
    names = set()
    for i in range(n_tensors):
        name = cur.string(f"tensor name #{i}", limit=MAX_NAME - 1)
        if name in names:
            raise cur.fail(f"duplicate tensor {name!r}")
        names.add(name)
        n_dims = cur.unpack("I", f"dims of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r}: {n_dims} dimensions (1..{MAX_DIMS} allowed)")
        ne = tuple(cur.unpack("Q", f"shape of {name!r}") for _ in range(n_dims))
        code = cur.unpack("I", f"type of {name!r}")
        offset = cur.unpack("Q", f"offset of {name!r}")
        infos.append((name, ne, code, offset))
    data_offset = align(cur.pos, alignment)
    if data_offset > size:
        raise cur.fail(f"truncated file: data section would start at byte {data_offset}")

    # imported here, so that a safetensors-only command (apply, verify) never loads gguf-py
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    tensors = []
    for name, ne, code, offset in infos:
        try:
            qtype = GGMLQuantizationType(code)
            block, _ = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise cur.fail(f"tensor {name!r}: unknown ggml type {code}") from None
        if any(d >= 1 << 62 for d in ne) or math.prod(ne) >= 1 << 62:
            raise cur.fail(f"tensor {name!r}: absurd shape {list(ne)}")
        if ne[0] % block:
            raise cur.fail(f"tensor {name!r}: ne0={ne[0]} is not a multiple of the {qtype.name} block size {block}")
        if offset % alignment:
            raise cur.fail(f"tensor {name!r}: data offset {offset} is not aligned to {alignment}")
        nbytes = tensor_nbytes(ne, code)
        start = data_offset + offset
        if start + nbytes > size:
            raise cur.fail(f"tensor {name!r}: data [{start}, {start + nbytes}) runs past the end of the file ({size} bytes)")
        tensors.append(TensorInfo(name, ne, code, offset, nbytes, path, start))
    by_offset = sorted(tensors, key=lambda t: t.offset)
    for a, b in zip(by_offset, by_offset[1:]):
        if a.offset + a.nbytes > b.offset:
            raise cur.fail(f"tensors {a.name!r} and {b.name!r} overlap")
    return GGUFFile(path, version, alignment, kvs, tensors, data_offset, size)


# ---------------------------------------------------------------- split files

_INTEGER_TYPES = (VType.UINT8, VType.INT8, VType.UINT16, VType.INT16, VType.UINT32, VType.INT32, VType.UINT64,
                  VType.INT64)
MAX_SPLIT = 99999   # five digits in llama.cpp's split names


def _split_int(g: GGUFFile, key: str, default: int | None, limit: int = MAX_SPLIT) -> int | None:
    kv = g.kvs.get(key)
    if kv is None:
        return default
    if kv.vtype not in _INTEGER_TYPES or not 0 <= kv.value <= limit:
        raise BadInput(g.path, f"metadata {key!r} must be an integer in 0..{limit}, got {kv.value!r:.40}")
    return kv.value

# a per-block tensor name: blk.<layer>.<rest>
BLOCK_TENSOR = re.compile(r"^blk\.(\d{1,9})\.(.+)$", re.ASCII | re.S)

SPLIT_PATTERN = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.ASCII | re.S)


def split_name(prefix: str, no: int, count: int) -> str:
    """llama.cpp's split naming: PREFIX-00001-of-00003.gguf (1-based)."""
    return f"{prefix}-{no:05d}-of-{count:05d}.gguf"


def read_model(path: str | Path) -> list[GGUFFile]:
    """All parts of a GGUF model: one file, or every part of a split starting from part 1."""
    path = Path(path)
    first = read_gguf(path)
    count = _split_int(first, "split.count", 1)
    if count in (0, 1):
        return [first]
    m = SPLIT_PATTERN.match(path.name)
    if _split_int(first, "split.no", 0) != 0 or not m:
        raise BadInput(path, f"part of a {count}-way split GGUF: open the first part "
                             f"(NAME-00001-of-{count:05d}.gguf)")
    parts = [first]
    for no in range(2, count + 1):
        p = path.with_name(split_name(m.group("prefix"), no, count))
        if not p.is_file():
            raise BadInput(p, f"split part {no} of {count} is missing")
        part = read_gguf(p)
        if _split_int(part, "split.no", None) != no - 1 or _split_int(part, "split.count", None) != count:
            raise BadInput(p, f"split metadata says part {part.get('split.no')!r} of {part.get('split.count')!r}, "
                              f"expected {no - 1} of {count} (0-based split.no)")
        parts.append(part)
    total = _split_int(first, "split.tensors.count", None, limit=MAX_TENSORS)
    found = sum(len(p.tensors) for p in parts)
    if total is not None and total != found:
        raise BadInput(path, f"split.tensors.count is {total} but the parts hold {found} tensors")
    names = [t.name for p in parts for t in p.tensors]
    if len(set(names)) != len(names):
        raise BadInput(path, "a tensor name appears in two split parts")
    return parts


# ---------------------------------------------------------------- long arrays

def kv_array(kv: KV, path: Path) -> list:
    """Every element of an array entry, long ones included (the header parse keeps arrays of more
    than a few thousand elements, such as tokenizer vocabularies, only as raw bytes)."""
    if kv.vtype != VType.ARRAY:
        raise BadInput(path, f"metadata {kv.key!r} must be an array")
    if kv.value is not None:
        return kv.value
    cur = _Cursor(memoryview(kv.raw), path)
    cur.string(f"metadata key of {kv.key!r}", limit=1 << 16)
    cur.unpack("I", f"type of {kv.key!r}")
    et = _vtype(cur, cur.unpack("I", f"metadata {kv.key!r} element type"), f"metadata {kv.key!r}")
    count = cur.unpack("Q", f"metadata {kv.key!r} element count")
    if et == VType.STRING:
        return [cur.string(f"metadata {kv.key!r}[{i}]") for i in range(count)]
    return list(struct.unpack_from(f"<{count}{_SCALAR[et]}", cur.buf, cur.pos))
