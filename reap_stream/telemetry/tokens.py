"""The calibration token ids of a run, kept in its work dir as a Zarr v3 group: flat `tokens`
(int32) and `offsets` (int64), with the fingerprint they must still match when read back."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from ..errors import BadInput
from ..io import zarr as zarr_io
from ..io.files import read_store_attrs
from .calibration import CalibrationSet, token_fingerprint

CALIBRATION_FORMAT = "reap-stream-calibration"
CALIBRATION_SCHEMA_VERSION = 1


def save_tokens(calib: CalibrationSet, path: str | Path) -> Path:
    """Write the token ids as a Zarr v3 group (flat `tokens` int32 + `offsets` int64), atomically:
    into a temporary directory, renamed into place when complete."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    flat = np.concatenate(calib.sequences).astype(np.int32)
    offsets = np.zeros(len(calib.sequences) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in calib.sequences], out=offsets[1:])
    # written directly (one raw chunk each, as zarr-python would store it): always read whole
    zarr_io.write_group(tmp, {"format": CALIBRATION_FORMAT, "schema_version": CALIBRATION_SCHEMA_VERSION,
                              **calib.summary(), "shaping": calib.shaping})
    zarr_io.write_array(tmp / "tokens", flat)
    zarr_io.write_array(tmp / "offsets", offsets)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def load_tokens(path: str | Path) -> CalibrationSet:
    """Read a group written by `save_tokens`; the ids must still match their fingerprint."""
    path = Path(path)
    attrs = read_store_attrs(path, "calibration token", CALIBRATION_FORMAT, CALIBRATION_SCHEMA_VERSION)
    flat, offsets = (zarr_io.read_array(path / name)[0] for name in ("tokens", "offsets"))
    if flat.ndim != 1 or offsets.ndim != 1 or flat.dtype.kind not in "iu" or offsets.dtype.kind not in "iu":
        raise BadInput(path, "tokens and offsets must be 1-D integer arrays")
    flat, offsets = flat.astype(np.int32, copy=False), offsets.astype(np.int64, copy=False)
    if not len(offsets) or offsets[0] != 0 or offsets[-1] != len(flat) or np.any(np.diff(offsets) < 0):
        raise BadInput(path, "token offsets do not cover the token array")
    sequences = [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    shaping, source, window = attrs.get("shaping", {}), attrs.get("source", {}), attrs.get("window_tokens", 0)
    if not isinstance(shaping, dict) or not isinstance(source, dict) or isinstance(window, bool) \
            or not isinstance(window, int):
        raise BadInput(path, "malformed attributes (shaping, source, window_tokens)")
    fp = token_fingerprint(sequences, shaping)
    if fp != attrs.get("fingerprint"):
        raise BadInput(path, f"token ids do not match the stored fingerprint "
                             f"({fp} != {attrs.get('fingerprint')!r:.80})")
    return CalibrationSet(sequences=sequences, fingerprint=fp, source=source,
                          packed=bool(attrs.get("packed")), window_tokens=window, shaping=shaping)
