"""Small uncompressed Zarr v3 nodes written and read directly.

zarr-python spends 3-8 ms per array on its async machinery whatever the size; for the
per-layer telemetry commit (7 arrays of a few KiB) and the per-chunk hidden-state spill that is
most of their cost (docs/reference_bench.md). The nodes written here are what zarr-python writes
for the same arrays (same zarr.json documents, tests/test_zarr_io.py): one chunk covering the
array, the `bytes` codec, little endian, chunk key `c/0/...`. Anything else is read through zarr.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ZARR_JSON = "zarr.json"


def _document(doc: dict) -> bytes:
    return json.dumps(doc, indent=2).encode()


def write_group(path: str | Path, attributes: dict | None = None) -> None:
    """A group node at path (the directory is created)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    doc = {"attributes": attributes or {}, "zarr_format": 3, "node_type": "group"}
    (path / ZARR_JSON).write_bytes(_document(doc))


def array_metadata(shape: tuple, dtype: np.dtype, attributes: dict | None = None) -> dict:
    """zarr.json of an uncompressed array stored as one chunk."""
    dtype = np.dtype(dtype)
    return {
        "shape": list(shape),
        "data_type": dtype.name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(shape)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0.0 if dtype.kind == "f" else 0,
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
        "attributes": attributes or {},
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


def _chunk_key(ndim: int) -> str:
    return "/".join(["c"] + ["0"] * ndim)


def write_array(path: str | Path, data: np.ndarray, attributes: dict | None = None) -> None:
    """An array node at path holding `data` (numeric, at least 1-D) as one chunk (none when empty)."""
    data = np.asarray(data)
    if data.ndim == 0 or data.dtype.kind not in "iuf":
        raise ValueError(f"cannot store a {data.dtype} array of shape {data.shape} as one raw chunk")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if data.size:
        chunk = path / _chunk_key(data.ndim)
        chunk.parent.mkdir(parents=True, exist_ok=True)
        chunk.write_bytes(np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<")).data)
    (path / ZARR_JSON).write_bytes(_document(array_metadata(data.shape, data.dtype, attributes)))


def read_array(path: str | Path) -> tuple[np.ndarray, dict]:
    """(data, attributes) of an array node; through zarr unless it has the layout written above."""
    path = Path(path)
    meta = json.loads((path / ZARR_JSON).read_text())
    if not isinstance(meta, dict):
        raise ValueError(f"{path / ZARR_JSON} is not a JSON object")
    shape = tuple(meta.get("shape") or ())
    try:
        dtype = np.dtype(meta.get("data_type"))
    except TypeError:
        dtype = None
    attributes = meta.get("attributes") or {}
    if dtype is not None and shape and meta == array_metadata(shape, dtype, attributes):
        if 0 in shape:
            return np.zeros(shape, dtype), attributes
        chunk = path / _chunk_key(len(shape))
        if chunk.is_file() and chunk.stat().st_size == int(np.prod(shape)) * dtype.itemsize:
            return np.fromfile(chunk, dtype=dtype.newbyteorder("<")).reshape(shape), attributes
    import zarr

    arr = zarr.open_array(str(path), mode="r")
    return np.asarray(arr[...]), dict(arr.attrs)
