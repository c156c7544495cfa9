"""Small uncompressed Zarr v3 nodes written and read directly.

zarr-python spends 3-8 ms per array on its async machinery whatever the size; for the
per-layer telemetry commit (7 arrays of a few KiB) and the per-chunk hidden-state spill that is
most of their cost (docs/reference_bench.md). The nodes written here are what zarr-python writes
for the same arrays (same zarr.json documents, tests/test_zarr_io.py): one chunk covering the
array, the `bytes` codec, little endian, chunk key `c/0/...`. Anything else is read through zarr.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..errors import BadInput, os_error
from .reading import read_json_object, regular_file

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


# what the stores of this project hold; anything else in a zarr.json is a corrupt or foreign file
DATA_TYPES = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                        "float16", "float32", "float64"})
# bounds for arrays read through zarr-python (not our one-chunk layout): its reader allocates the
# declared shape and visits every chunk, so a corrupt shape would otherwise ask for terabytes
MAX_ZARR_BYTES = 4 << 30
MAX_ZARR_CHUNKS = 1 << 16


def _shape(value: object, where: Path, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in value) or len(value) > 32:
        raise BadInput(where, f"{what} is not a list of array dimensions: {value!r:.80}")
    return tuple(value)


def read_array(path: str | Path) -> tuple[np.ndarray, dict]:
    """(data, attributes) of an array node; through zarr unless it has the layout written above.
    Every fault of the node (its zarr.json, its chunks) is a BadInput naming it."""
    path = Path(path)
    meta_path = path / ZARR_JSON
    meta = read_json_object(meta_path, "Zarr array metadata", missing="missing (not a Zarr array)")
    shape = _shape(meta.get("shape"), meta_path, "shape")
    dtype_name = meta.get("data_type")
    if not isinstance(dtype_name, str) or dtype_name not in DATA_TYPES:
        raise BadInput(meta_path, f"unsupported data_type {dtype_name!r:.40}")
    dtype = np.dtype(dtype_name)
    attributes = meta.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise BadInput(meta_path, "attributes is not an object")
    nbytes = math.prod(shape) * dtype.itemsize
    if meta == array_metadata(shape, dtype, attributes):
        if nbytes == 0:
            return np.zeros(shape, dtype), attributes
        chunk = path / _chunk_key(len(shape))
        size = regular_file(chunk, "Zarr chunk").st_size
        if size != nbytes:
            raise BadInput(chunk, f"chunk is {size:,} bytes, the array needs {nbytes:,} ({list(shape)} {dtype_name})")
        try:
            return np.fromfile(chunk, dtype=dtype.newbyteorder("<")).reshape(shape), attributes
        except OSError as e:
            raise os_error(e, chunk, doing="cannot read") from None
    return _read_with_zarr(path, meta, shape, nbytes), attributes


def _read_with_zarr(path: Path, meta: dict, shape: tuple[int, ...], nbytes: int) -> np.ndarray:
    grid = meta.get("chunk_grid")
    chunks = grid.get("configuration", {}).get("chunk_shape") if isinstance(grid, dict) and \
        isinstance(grid.get("configuration"), dict) else None
    chunk_shape = _shape(chunks, path / ZARR_JSON, "chunk_grid.configuration.chunk_shape")
    if len(chunk_shape) != len(shape) or 0 in chunk_shape and math.prod(shape):
        raise BadInput(path / ZARR_JSON, f"chunk shape {list(chunk_shape)} does not fit shape {list(shape)}")
    n_chunks = math.prod(-(-d // c) for d, c in zip(shape, chunk_shape)) if math.prod(shape) else 0
    if nbytes > MAX_ZARR_BYTES or n_chunks > MAX_ZARR_CHUNKS:
        raise BadInput(path / ZARR_JSON, f"array of shape {list(shape)} in {n_chunks:,} chunks is beyond the "
                                         f"{MAX_ZARR_BYTES:,}-byte / {MAX_ZARR_CHUNKS:,}-chunk limits of these stores")
    import zarr

    try:
        return np.asarray(zarr.open_array(str(path), mode="r")[...])
    except Exception as e:  # zarr-python raises many types for a malformed node; all mean "unreadable"
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise BadInput(path, f"unreadable Zarr array ({type(e).__name__}: {first})") from None
