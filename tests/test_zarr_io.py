"""Small Zarr v3 nodes written directly are the nodes zarr-python writes, and zarr reads them."""
from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from reap_stream.errors import BadInput
from reap_stream.io import zarr as zarr_io
from cli_helpers import tree_bytes

RNG = np.random.default_rng(0)
ARRAYS = {
    "f64_1d": RNG.standard_normal(32),
    "f64_2d": RNG.standard_normal((32, 48)),
    "f32_2d": RNG.standard_normal((64, 16)).astype(np.float32),
    "bf16_bits": RNG.integers(0, 2**16, (64, 16)).astype(np.uint16),
    "i32": RNG.integers(-5, 5, 17).astype(np.int32),
    "empty": np.zeros((8, 0)),
}


def _zarr_python(path, data, attributes):
    arr = zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, chunks=data.shape, compressors=None,
                            fill_value=0, attributes=attributes, zarr_format=3)
    arr[...] = data


@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_an_array_is_stored_as_zarr_python_stores_it(name, tmp_path):
    data, attrs = ARRAYS[name], {"dtype": name}
    zarr_io.write_array(tmp_path / "ours", data, attrs)
    _zarr_python(tmp_path / "theirs", data, attrs)
    ours, theirs = tree_bytes(tmp_path / "ours"), tree_bytes(tmp_path / "theirs")
    assert sorted(ours) == sorted(theirs)
    for rel, raw in ours.items():
        assert (json.loads(raw) == json.loads(theirs[rel])) if rel.endswith("zarr.json") else (raw == theirs[rel])
    back = zarr.open_array(str(tmp_path / "ours"), mode="r")
    assert np.array_equal(back[...], data) and back.dtype == data.dtype and dict(back.attrs) == attrs
    fast, fast_attrs = zarr_io.read_array(tmp_path / "theirs")
    assert np.array_equal(fast, data) and fast.dtype == data.dtype and fast_attrs == attrs


def test_a_group_is_a_zarr_group_with_its_attributes(tmp_path):
    zarr_io.write_group(tmp_path / "g", {"layer": 3, "tokens": 4096})
    zarr_io.write_array(tmp_path / "g" / "frequency", ARRAYS["f64_1d"])
    g = zarr.open_group(str(tmp_path / "g"), mode="r")
    assert dict(g.attrs) == {"layer": 3, "tokens": 4096}
    assert np.array_equal(g["frequency"][...], ARRAYS["f64_1d"])


def test_other_layouts_are_read_through_zarr(tmp_path):
    data = RNG.standard_normal((300, 8)).astype(np.float32)
    arr = zarr.create_array(str(tmp_path / "z"), shape=data.shape, dtype=data.dtype, chunks=(128, 8),
                            attributes={"dtype": "float32"})  # zarr's default compressor, three chunks
    arr[...] = data
    back, attrs = zarr_io.read_array(tmp_path / "z")
    assert np.array_equal(back, data) and attrs == {"dtype": "float32"}


def test_a_truncated_chunk_is_not_read_as_data(tmp_path):
    zarr_io.write_array(tmp_path / "a", ARRAYS["f32_2d"])
    chunk = tmp_path / "a" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-4])
    with pytest.raises(BadInput, match="chunk is 4,092 bytes, the array needs 4,096"):
        zarr_io.read_array(tmp_path / "a")


def test_scalars_and_non_numeric_arrays_are_refused(tmp_path):
    for bad in (np.float64(1.0), np.array([True, False]), np.array(["a"])):
        with pytest.raises(ValueError):
            zarr_io.write_array(tmp_path / "x", bad)
