"""GGUF writing: metadata entries and tensor infos encoded, the consecutive aligned data offsets
llama.cpp requires (it checks each offset equals the padded running size), and those layout rules
checked on a written file."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BadInput
from .gguf import _SCALAR, MAGIC, GGUFFile, VType, align, read_gguf


def encode_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def encode_kv(key: str, vtype: VType, value: Any, elem_type: VType | None = None) -> bytes:
    """One encoded metadata entry (key, type, value)."""
    out = encode_string(key) + struct.pack("<I", vtype)
    if vtype == VType.STRING:
        return out + encode_string(value)
    if vtype != VType.ARRAY:
        return out + struct.pack("<" + _SCALAR[vtype], value)
    items = list(value)
    out += struct.pack("<IQ", elem_type, len(items))
    if elem_type == VType.STRING:
        return out + b"".join(encode_string(s) for s in items)
    return out + struct.pack(f"<{len(items)}{_SCALAR[elem_type]}", *items)


@dataclass(frozen=True)
class OutTensor:
    """One tensor of a planned output: header entry plus the source byte ranges it is made of."""
    name: str
    ne: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int
    pieces: tuple[tuple[int, int], ...]   # (absolute start, length) in the source part, in order
    sliced: bool = False                  # expert axis shortened by the plan


def encode_header(version: int, kv_raw: list[bytes], tensors: list[OutTensor], alignment: int) -> bytes:
    """Magic, counts, metadata, tensor infos, zero padding up to the data section."""
    out = [MAGIC, struct.pack("<IQQ", version, len(tensors), len(kv_raw)), *kv_raw]
    for t in tensors:
        out.append(encode_string(t.name) + struct.pack(f"<I{len(t.ne)}QIQ", len(t.ne), *t.ne, t.ggml_type, t.offset))
    head = b"".join(out)
    return head + bytes(-len(head) % alignment)


def plan_offsets(sizes: list[int], alignment: int) -> list[int]:
    """Consecutive data offsets, each aligned: what llama.cpp's loader expects (it sums padded sizes)."""
    offsets, pos = [], 0
    for n in sizes:
        offsets.append(pos)
        pos = align(pos + n, alignment)
    return offsets


# ---------------------------------------------------------------- verification

@dataclass
class Verdict:
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: str | Path) -> Verdict:
    """The structural checks llama.cpp's loader makes, on top of read_gguf's validation:
    offsets consecutive and aligned in info order, data section ending at the last tensor."""
    try:
        g = read_gguf(path)
    except BadInput as e:
        return Verdict([e.what])
    return Verdict(layout_problems(g))


def layout_problems(g: GGUFFile) -> list[str]:
    """`verify`'s checks on an already parsed file (callers holding one need not parse it again)."""
    problems = []
    expected = plan_offsets([t.nbytes for t in g.tensors], g.alignment)
    for t, off in zip(g.tensors, expected):
        if t.offset != off:
            problems.append(f"tensor {t.name!r}: offset {t.offset}, llama.cpp expects {off}")
    end = g.data_offset + (g.tensors[-1].offset + g.tensors[-1].nbytes if g.tensors else 0)
    if g.size not in (end, align(end, g.alignment)):  # gguf-py pads the last tensor too
        problems.append(f"file is {g.size} bytes, data ends at {end}")
    return problems
