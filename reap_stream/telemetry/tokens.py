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
from .sources import _one_line

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
    import zarr

    path = Path(path)
    attrs = read_store_attrs(path, "calibration token", CALIBRATION_FORMAT, CALIBRATION_SCHEMA_VERSION)
    g = zarr.open_group(str(path), mode="r")
    try:
        flat = np.asarray(g["tokens"][...], dtype=np.int32)
        offsets = np.asarray(g["offsets"][...], dtype=np.int64)
    except (KeyError, OSError, ValueError) as e:
        raise BadInput(path, f"unreadable token arrays: {_one_line(e)}") from None
    if offsets[0] != 0 or offsets[-1] != len(flat) or np.any(np.diff(offsets) < 0):
        raise BadInput(path, "token offsets do not cover the token array")
    sequences = [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    shaping = attrs.get("shaping", {})
    fp = token_fingerprint(sequences, shaping)
    if fp != attrs.get("fingerprint"):
        raise BadInput(path, f"token ids do not match the stored fingerprint ({fp} != {attrs.get('fingerprint')})")
    return CalibrationSet(sequences=sequences, fingerprint=fp, source=attrs.get("source", {}),
                          packed=bool(attrs.get("packed")), window_tokens=int(attrs.get("window_tokens", 0)),
                          shaping=shaping)
