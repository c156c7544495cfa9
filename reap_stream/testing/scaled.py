"""Synthetic checkpoints with a real model's shapes, of any size, written without holding them.

`write_scaled(config, out)` instantiates mlx_lm's model class of `config` without evaluating it (the
tensor names, shapes and dtypes come from the skeleton, quantised as `mlx_lm convert -q` would
quantise it), then writes every tensor in seeded random values, block by block, into safetensors
shards. Values are drawn by tensor role (routers wide enough to route variedly, norms near 1, the
rest ~N(0, 1/fan_in)); a pool of random blocks is reused with seeded offsets, so tens of GB are
written at the disk's speed. Used by `tools/bench_scale.py` (a model larger than the machine's RAM)
and by the tests (the same code on a small model).
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

from ..io.safetensors import DTYPE_BITS
from ..runner.budget import config_tensors
from .synth import write_tokenizer

_POOL_VALUES = 1 << 24          # float32 values per pool block (64 MiB)
_WRITE_VALUES = 1 << 22         # values converted and written at a time


def _scale(name: str, shape: tuple, hidden: int) -> tuple[float, float]:
    """(mean, std) of a tensor's values by role."""
    if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight", "mlp.router.weight")):
        return 0.0, 2.0 / math.sqrt(hidden)
    if name.endswith("e_score_correction_bias"):
        return 0.25, 0.1
    if name.endswith("embed_tokens.weight"):
        return 0.0, 1.0
    if len(shape) == 1 and name.endswith(".weight"):
        return 1.0, 0.1
    if name.endswith(".bias"):
        return 0.0, 0.05
    return 0.0, 1.0 / math.sqrt(shape[-1])


class _Values:
    """Seeded values from a reused pool of standard-normal draws, per (dtype, mean, std) converted
    once, taken at seeded offsets (wrapping around)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.normal = self.rng.standard_normal(_POOL_VALUES, dtype=np.float32)
        self.pools: dict[tuple, np.ndarray] = {}

    def take(self, st: str, mean: float, std: float, n: int) -> bytes:
        key = (st, mean, std)
        if key not in self.pools:
            v = self.normal * np.float32(std) + np.float32(mean)
            self.pools[key] = (v.view(np.uint32) >> 16).astype(np.uint16) if st == "BF16" else \
                v.astype(np.float16 if st == "F16" else np.float32)
        pool = self.pools[key]
        start = int(self.rng.integers(0, len(pool)))
        first = pool[start:start + n]
        return first.tobytes() + pool[: n - len(first)].tobytes()


def _blocks(name: str, st: str, shape: tuple, values: _Values, hidden: int, quant: dict | None):
    """The tensor's bytes, in blocks."""
    total = math.prod(shape)
    if st == "U32":   # packed quantised weights: any bits are valid codes
        rng = np.random.default_rng(values.rng.integers(1 << 62))
        for lo in range(0, total, _WRITE_VALUES):
            yield rng.integers(0, 1 << 32, min(_WRITE_VALUES, total - lo), dtype=np.uint32).tobytes()
        return
    mean, std = _scale(name, shape, hidden)
    if quant is not None and name.endswith((".scales", ".biases")):
        # codes uniform in [0, 2^bits): value = code * scale + bias, ~N(0, 1/fan_in) overall
        bits = quant["bits"]
        fan_in = shape[-1] * quant["group_size"]
        scale = math.sqrt(12.0 / fan_in) / (2 ** bits - 1)
        mean, std = (scale, 0.0) if name.endswith(".scales") else (-scale * (2 ** bits - 1) / 2, 0.0)
    for lo in range(0, total, _WRITE_VALUES):
        yield values.take(st, mean, std, min(_WRITE_VALUES, total - lo))


def write_scaled(config: dict, out: Path, *, bits: int | None = None, seed: int = 0,
                 shard_bytes: int = 4 << 30, progress: bool = False) -> Path:
    """Write the synthetic checkpoint of `config` (see the module docstring) to `out`."""
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors, config, _ = config_tensors(config, bits)
    quant = config.get("quantization")
    sizes = {n: math.prod(shape) * DTYPE_BITS[st] // 8 for n, (st, shape) in tensors.items()}
    shards: list[list[str]] = [[]]
    acc = 0
    for name in sorted(tensors):
        if shards[-1] and acc + sizes[name] > shard_bytes:
            shards.append([])
            acc = 0
        shards[-1].append(name)
        acc += sizes[name]
    values = _Values(seed)
    hidden = int(config["hidden_size"])
    weight_map = {}
    with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="write", disable=not progress) as bar:
        for i, names in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            header, offset = {}, 0
            for n in names:
                header[n] = {"dtype": tensors[n][0], "shape": list(tensors[n][1]),
                             "data_offsets": [offset, offset + sizes[n]]}
                offset += sizes[n]
            header["__metadata__"] = {"format": "mlx"}
            raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            with open(out / fname, "wb") as f:
                f.write(struct.pack("<Q", len(raw)) + raw)
                for n in names:
                    for block in _blocks(n, *tensors[n], values, hidden, quant):
                        f.write(block)
                        bar.update(len(block))
            weight_map.update({n: fname for n in names})
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (out / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")
    write_tokenizer(out)
    return out
