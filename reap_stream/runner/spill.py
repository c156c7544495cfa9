"""The hidden states between layers, spilled to the work dir (one Zarr array per chunk)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..blas import mlx_core
from ..errors import BadInput
from ..io import zarr as zarr_io


def spill_itemsize(model) -> int:
    """Bytes per spilled hidden-state element: the model's 16-bit compute dtype where its floating
    tensors (quantisation scales included) are 16-bit, else float32 (a GGUF runs dequantised to it)."""
    if model.checkpoint is None:
        return 4
    counts: dict[int, int] = {}
    for ref in model.checkpoint.tensors.values():
        if ref.dtype in ("F32", "F16", "BF16"):
            size = 4 if ref.dtype == "F32" else 2
            counts[size] = counts.get(size, 0) + ref.nbytes
    return max(counts, key=counts.get) if counts else 4


class HiddenSpill:
    """WORK_DIR/hidden_NNN: the input of layer NNN, one uncompressed Zarr array per chunk.

    Written and read with zarr_io: one raw chunk per array, as zarr-python would store it, without
    its per-call overhead. Uncompressed: lz4+shuffle saves only ~5% (f32) / ~12% (bf16) of these
    near-random values but made the spill 1.4-2.6x slower to write and read back
    (docs/reference_bench.md)."""

    def __init__(self, work_dir: Path):
        self.root = Path(work_dir)

    def path(self, layer: int, tmp: bool = False) -> Path:
        return self.root / (f".hidden_{layer:03d}.tmp" if tmp else f"hidden_{layer:03d}")

    def complete(self, layer: int) -> bool:
        return (self.path(layer) / "zarr.json").is_file()

    def begin(self, layer: int) -> None:
        tmp = self.path(layer, tmp=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        zarr_io.write_group(tmp)

    def write(self, layer: int, chunk: int | str, h) -> None:
        mx = mlx_core()
        if h.dtype == mx.bfloat16:
            data, dtype = np.array(h.view(mx.uint16)), "bfloat16"
        else:
            data = np.array(h)
            dtype = data.dtype.name
        name = f"c{chunk:06d}" if isinstance(chunk, int) else f"c{chunk}"
        zarr_io.write_array(self.path(layer, tmp=True) / name, data, {"dtype": dtype})

    def finish(self, layer: int) -> None:
        tmp, final = self.path(layer, tmp=True), self.path(layer)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)

    def read(self, layer: int, chunk: int | str):
        mx = mlx_core()
        path = self.path(layer) / (f"c{chunk:06d}" if isinstance(chunk, int) else f"c{chunk}")
        try:
            data, attrs = zarr_io.read_array(path)
        except Exception as e:  # whatever broke in our own work dir, the remedy is the same
            raise BadInput(path, f"unreadable hidden states ({e}); delete the work dir and rerun") from None
        data = mx.array(data)
        if attrs.get("dtype") == "bfloat16":
            data = data.view(mx.bfloat16)
        return data

    def write_state(self, layer: int, chunk: int, state) -> None:
        """The state a layer hands to layer `layer` with its hidden state (a tree of tuples, arrays,
        numbers and None), beside that hidden state: committed and dropped with it."""
        leaves: list = []

        def spec(v):
            if v is None or isinstance(v, (bool, int, float)):
                return {"v": v}
            if isinstance(v, (tuple, list)):
                return {"items": [spec(x) for x in v]}
            if not isinstance(v, mx.array):
                raise BadInput("model", f"a decoder layer hands a {type(v).__name__} to the next layer, which a "
                                        f"layer-by-layer run cannot carry")
            leaves.append(v)
            return {"array": len(leaves) - 1}

        mx = mlx_core()
        tree = spec(state)
        for j, leaf in enumerate(leaves):
            self.write(layer, f"{chunk:06d}_s{j}", leaf)
        zarr_io.write_group(self.path(layer, tmp=True) / f"s{chunk:06d}", {"state": tree})

    def read_state(self, layer: int, chunk: int):
        path = self.path(layer) / f"s{chunk:06d}"
        try:
            tree = json.loads((path / zarr_io.ZARR_JSON).read_text())["attributes"]["state"]
        except Exception as e:
            raise BadInput(path, f"unreadable layer state ({e}); delete the work dir and rerun") from None

        def value(t):
            if "items" in t:
                return tuple(value(x) for x in t["items"])
            if "array" in t:
                return self.read(layer, f"{chunk:06d}_s{t['array']}")
            return t["v"]
        return value(tree)

    def drop_temporaries(self) -> None:
        """Remove half-written layers (after a failed write: they free space, and a resumed run
        recomputes them)."""
        if self.root.is_dir():
            for p in self.root.glob(".hidden_*.tmp"):
                shutil.rmtree(p, ignore_errors=True)

    def drop(self, layer: int) -> None:
        for p in (self.path(layer), self.path(layer, tmp=True)):
            if p.exists():
                shutil.rmtree(p)
