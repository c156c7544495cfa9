"""Telemetry store: a Zarr v3 group with one subgroup of float64 per-expert sums per MoE layer.

Layout of TELEMETRY.zarr:
    zarr.json                 root attributes: format, schema_version, model (structure +
                              fingerprint), calibration, routing, tool_version
    layer_007/                one committed MoE layer (attributes: layer, num_experts, hidden, tokens)
        frequency             [E]     |A_j|, tokens whose top-k holds j
        weighted_frequency_sum[E]     sum over A_j of the router weight g
        ean_sum               [E]     sum over A_j of ||f_j(x)||_2
        weighted_ean_sum      [E]     sum over A_j of g * ||f_j(x)||_2
        expert_output_sum     [E, H]  sum over A_j of f_j(x)        (for ean_ca)
        max_activations       [E]     signed max element of f_j(x)  (-inf when never routed)
        coactivation          [E, E]  tokens routed to both i and j (diagonal = frequency)

Every array merges across chunks, runs and machines by addition (max for max_activations).
A layer is committed by writing it under a temporary name and renaming the directory, so a
killed run leaves either a whole layer or none.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io import zarr as zarr_io
from ..errors import BadInput
from ..io.files import fsync_tree, read_store_attrs
from ..io.reading import is_index, read_json_object, resolved

TELEMETRY_FORMAT = "reap-stream-telemetry"
TELEMETRY_SCHEMA_VERSION = 1


@dataclass
class LayerStats:
    layer: int
    tokens: int
    frequency: np.ndarray
    weighted_frequency_sum: np.ndarray
    ean_sum: np.ndarray
    weighted_ean_sum: np.ndarray
    expert_output_sum: np.ndarray
    max_activations: np.ndarray
    coactivation: np.ndarray

    ARRAYS = ("frequency", "weighted_frequency_sum", "ean_sum", "weighted_ean_sum",
              "expert_output_sum", "max_activations", "coactivation")

    @classmethod
    def zeros(cls, layer: int, num_experts: int, hidden: int) -> "LayerStats":
        e = num_experts
        return cls(layer, 0, np.zeros(e), np.zeros(e), np.zeros(e), np.zeros(e),
                   np.zeros((e, hidden)), np.full(e, -np.inf), np.zeros((e, e)))

    @property
    def num_experts(self) -> int:
        return self.frequency.shape[0]

    def add(self, other: "LayerStats") -> None:
        if other.frequency.shape != self.frequency.shape or other.expert_output_sum.shape != self.expert_output_sum.shape:
            raise BadInput(f"layer {self.layer}", "cannot merge telemetry of different shapes")
        self.tokens += other.tokens
        for name in self.ARRAYS:
            mine, theirs = getattr(self, name), getattr(other, name)
            if name == "max_activations":
                np.maximum(mine, theirs, out=mine)
            else:
                mine += theirs

    def equal(self, other: "LayerStats") -> bool:
        return self.tokens == other.tokens and all(
            np.array_equal(getattr(self, n), getattr(other, n)) for n in self.ARRAYS)


def layer_store_bytes(num_experts: int, hidden: int) -> int:
    """Bytes one committed layer's arrays take (float64; a few KB of metadata aside)."""
    e = num_experts
    return 8 * (5 * e + e * hidden + e * e)   # five [E] arrays, [E, H] and [E, E]


class Fingerprint:
    """TelemetryStore.fingerprint built up layer by layer (ascending), for callers that read every
    layer anyway (the planner): one pass over the store instead of two."""

    def __init__(self):
        self._h = hashlib.sha256()

    def add(self, st: LayerStats) -> None:
        self._h.update(f"{st.layer}:{st.tokens}".encode())
        for name in LayerStats.ARRAYS:
            self._h.update(np.ascontiguousarray(getattr(st, name), dtype="<f8").tobytes())

    def hexdigest(self) -> str:
        return "sha256:" + self._h.hexdigest()


def _group_attrs(path: Path) -> dict:
    """The attributes of the Zarr group at path (read directly: zarr-python costs ms per node)."""
    meta = Path(path) / zarr_io.ZARR_JSON
    attrs = read_json_object(meta, "Zarr group metadata").get("attributes")
    if not isinstance(attrs, dict):
        raise BadInput(meta, "not a Zarr group description (no 'attributes' object)")
    return attrs


def layer_key(layer: int) -> str:
    return f"layer_{layer:03d}"


class TelemetryStore:
    """A telemetry directory. Attributes live in the root group; layers are subgroups."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def create(cls, path: str | Path, attrs: dict) -> "TelemetryStore":
        path = Path(path)
        if path.is_dir():
            shutil.rmtree(path)  # a new store replaces whatever was there
        zarr_io.write_group(path, {"format": TELEMETRY_FORMAT, "schema_version": TELEMETRY_SCHEMA_VERSION, **attrs})
        return cls(path)

    @classmethod
    def open(cls, path: str | Path) -> "TelemetryStore":
        path = Path(path)
        read_store_attrs(path, "telemetry", TELEMETRY_FORMAT, TELEMETRY_SCHEMA_VERSION)
        return cls(path)

    @property
    def attrs(self) -> dict:
        return _group_attrs(self.path)

    def layers(self) -> list[int]:
        """Committed layers, ascending."""
        out = []
        for p in self.path.iterdir():
            if p.name.startswith("layer_") and is_index(p.name[6:]) and p.is_dir():
                out.append(int(p.name[6:]))
        return sorted(out)

    def read(self, layer: int) -> LayerStats:
        path = self.path / layer_key(layer)
        if not path.is_dir():
            raise BadInput(self.path, f"layer {layer} has no committed telemetry")
        attrs = _group_attrs(path)
        tokens, e = attrs.get("tokens"), attrs.get("num_experts")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (tokens, e)):
            raise BadInput(path / zarr_io.ZARR_JSON, "layer attributes need integer 'tokens' and 'num_experts'")
        arrays = {}
        for name in LayerStats.ARRAYS:
            if not (path / name / zarr_io.ZARR_JSON).is_file():
                raise BadInput(path, f"telemetry array {name!r} is missing")
            arrays[name] = np.asarray(zarr_io.read_array(path / name)[0], dtype=np.float64)
        hidden = arrays["expert_output_sum"].shape[-1] if arrays["expert_output_sum"].ndim == 2 else -1
        want = {"expert_output_sum": (e, hidden), "coactivation": (e, e)}
        for name, arr in arrays.items():
            if arr.shape != want.get(name, (e,)):
                raise BadInput(path / name, f"shape {list(arr.shape)} does not fit the layer's {e} experts")
        return LayerStats(layer=layer, tokens=tokens, **arrays)

    def fingerprint(self) -> str:
        """sha256 over every committed layer's arrays and token count."""
        fp = Fingerprint()
        for layer in self.layers():
            fp.add(self.read(layer))
        return fp.hexdigest()

    def commit(self, stats: LayerStats) -> None:
        """Write one layer atomically: into a temporary directory, then rename into place."""
        final = self.path / layer_key(stats.layer)
        tmp = self.path / f".{layer_key(stats.layer)}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        # written directly (zarr_io): zarr-python's per-array overhead was most of a commit's time
        zarr_io.write_group(tmp, {"layer": stats.layer, "num_experts": stats.num_experts,
                                  "hidden": int(stats.expert_output_sum.shape[1]), "tokens": int(stats.tokens)})
        for name in LayerStats.ARRAYS:
            zarr_io.write_array(tmp / name, np.asarray(getattr(stats, name), dtype=np.float64))
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)


def merge_stores(paths: list[Path], out: Path) -> TelemetryStore:
    """Add stores of the same model and routing settings, collected on disjoint calibration shards."""
    if any(resolved(p) == resolved(out) for p in paths):
        raise BadInput(out, "the merged store would overwrite one of its inputs")
    stores = [TelemetryStore.open(p) for p in paths]
    first = stores[0].attrs
    for s in stores[1:]:
        a = s.attrs
        for key in ("model", "routing"):
            if a.get(key) != first.get(key):
                raise BadInput(s.path, f"{key} differs from {stores[0].path} (telemetry of another model or routing setting)")
        if s.layers() != stores[0].layers():
            raise BadInput(s.path, f"layers {s.layers()} differ from {stores[0].path}'s {stores[0].layers()}")
    calib = [s.attrs.get("calibration") for s in stores]
    tokens = [c.get("num_tokens", 0) if isinstance(c, dict) else 0 if c is None else None for c in calib]
    for s, n in zip(stores, tokens):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise BadInput(s.path, f"calibration.num_tokens is not a token count ({n!r:.40})")
    attrs = {k: v for k, v in first.items() if k not in ("format", "schema_version", "calibration")}
    attrs["calibration"] = {"merged": calib, "num_tokens": sum(tokens)}
    merged = TelemetryStore.create(out, attrs)
    for layer in stores[0].layers():
        total = stores[0].read(layer)
        for s in stores[1:]:
            total.add(s.read(layer))
        merged.commit(total)
    return merged
