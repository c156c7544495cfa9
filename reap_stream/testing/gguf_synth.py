"""Synthetic MoE GGUF files for any architecture gguf-py knows, written from gguf-py's own tables.

Every block holds, for its architecture, each expert-axis tensor gguf-py lists (routed and chunk
expert stacks, router, selection bias) plus the shared-expert and look-alike tensors it lists and
an attention norm, with random weights; expert stacks in a block type (Q8_0 by default) so that
slicing is checked on quantised bytes. The data is streamed to disk, so the same writer makes the
multi-GB files of tools/bench_gguf.py. Not a model anything can run: a file whose layout is what
llama.cpp's converter writes for that architecture's MoE blocks.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf.constants import MODEL_TENSORS, TENSOR_NAMES, GGMLQuantizationType as T

from ..families.gguf_arch import GROUP_KEYS, LOOK_ALIKES, Role, arch_enum, arch_expert_tensors, known_arch
from ..io.gguf import VType, tensor_nbytes
from ..io.gguf_write import OutTensor, encode_header, encode_kv, plan_offsets

_CHUNK = 8 << 20


def _shared_bases(arch: str) -> list[str]:
    """Tensors gguf-py lists for the arch that sit in the MoE block without an expert axis."""
    if not known_arch(arch):
        return []
    out = []
    for t in MODEL_TENSORS[arch_enum(arch)]:
        name = TENSOR_NAMES[t]
        if name.startswith("blk.{bid}.") and ("_shexp" in name or t in LOOK_ALIKES):
            out.append(name[len("blk.{bid}."):])
    return out


def _specs(arch: str, layers: int, experts: int, hidden: int, ff: int, qtype: T, group: int | None,
           roles: dict[str, Role]) -> list[tuple[str, tuple[int, ...], T]]:
    specs = [("token_embd.weight", (hidden, 64), T.F32)]
    for L in range(layers):
        specs.append((f"blk.{L}.attn_norm.weight", (hidden,), T.F32))
        for base, role in roles.items():
            if role is Role.ROUTER:
                specs.append((f"blk.{L}.{base}.weight", (hidden, experts), T.F32))
            elif role is Role.SELECTION_BIAS:
                specs.append((f"blk.{L}.{base}.bias", (experts,), T.F32))
            else:
                n = experts // group if role is Role.CHUNK_EXPERTS else experts
                rows = 2 * ff if base.startswith("ffn_gate_up") else ff
                ne = (ff, hidden, n) if base.startswith("ffn_down") else (hidden, rows, n)
                specs.append((f"blk.{L}.{base}.weight", ne, qtype))
        stacks = [b for b, r in roles.items() if r is Role.EXPERTS]
        if stacks:   # the per-expert scale llama.cpp loads for any architecture
            specs.append((f"blk.{L}.{stacks[0]}.scale", (experts,), T.F32))
        for base in _shared_bases(arch):
            ne = (hidden,) if "norm" in base or base.startswith("ffn_gate_inp") else (hidden, ff)
            specs.append((f"blk.{L}.{base}.weight", ne, T.F32))
    specs.append(("output_norm.weight", (hidden,), T.F32))
    return specs


def _random_bytes(rng: np.random.Generator, qtype: T, n: int) -> bytes:
    if qtype == T.Q8_0:   # finite f16 block scales: small positive values
        blocks = np.frombuffer(rng.bytes(n), np.uint8).copy().reshape(-1, 34)
        blocks[:, 1] &= 0x3B
        return blocks.tobytes()
    return rng.standard_normal(n // 4).astype(np.float32).tobytes()


def write_moe_gguf(path: str | Path, arch: str, *, layers: int = 2, experts: int = 8, top_k: int = 2,
                   hidden: int = 32, ff: int = 32, qtype: T = T.Q8_0, nextn: int = 0, seed: int = 0,
                   roles: dict[str, Role] | None = None) -> Path:
    """Write a synthetic MoE GGUF of `arch` (blocks 0..layers-1, the last `nextn` of them NextN)."""
    path = Path(path)
    roles = dict(arch_expert_tensors(arch) if roles is None else roles)
    group_key = GROUP_KEYS.get(arch)
    group = 2 if group_key else None
    specs = _specs(arch, layers, experts, hidden, ff, qtype, group, roles)
    sizes = [tensor_nbytes(ne, t) for _, ne, t in specs]
    tensors = [OutTensor(n, ne, t, off, size, ())
               for (n, ne, t), off, size in zip(specs, plan_offsets(sizes, 32), sizes)]
    kvs = [encode_kv("general.architecture", VType.STRING, arch),
           encode_kv(f"{arch}.block_count", VType.UINT32, layers),
           encode_kv(f"{arch}.expert_count", VType.UINT32, experts),
           encode_kv(f"{arch}.expert_used_count", VType.UINT32, top_k)]
    if group_key:
        kvs.append(encode_kv(f"{arch}.{group_key}", VType.UINT32, group))
    if nextn:
        kvs.append(encode_kv(f"{arch}.nextn_predict_layers", VType.UINT32, nextn))
    rng = np.random.default_rng(seed)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(encode_header(3, kvs, tensors, 32))
        for t in tensors:
            size = _CHUNK // 34 * 34 if t.ggml_type == T.Q8_0 else _CHUNK
            left = t.nbytes
            while left:
                n = min(left, size)
                f.write(_random_bytes(rng, t.ggml_type, n))
                left -= n
            f.write(bytes(-t.nbytes % 32))
    tmp.replace(path)
    return path
