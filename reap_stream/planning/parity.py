"""Compare two telemetry stores: normalised hashes, the first differing row, and whether the
difference changes which experts a plan prunes.

Verdicts: "identical" (every array bit-equal after normalisation), "equivalent" (arrays differ but
the prune sets agree in every layer), "different" (some layer prunes other experts).
"""
from __future__ import annotations

import hashlib

import numpy as np

from ..errors import BadInput
from .planner import PlanOptions, make_plan
from ..telemetry.store import LayerStats, TelemetryStore


def normalised_bytes(a: np.ndarray) -> bytes:
    """float64 little-endian, C order, -0.0 folded into 0.0 and one NaN pattern: equal values
    hash equally whatever the store's chunking, compression or the platform wrote."""
    x = np.ascontiguousarray(a, dtype="<f8") + 0.0   # -0.0 + 0.0 == +0.0
    x[np.isnan(x)] = np.nan
    return x.tobytes()


def layer_hashes(st: LayerStats) -> dict[str, str]:
    out = {"tokens": hashlib.sha256(str(int(st.tokens)).encode()).hexdigest()}
    for name in LayerStats.ARRAYS:
        arr = getattr(st, name)
        h = hashlib.sha256(repr(arr.shape).encode())
        h.update(normalised_bytes(arr))
        out[name] = h.hexdigest()
    return out


def store_hash(per_layer: dict[int, dict[str, str]]) -> str:
    h = hashlib.sha256()
    for layer in sorted(per_layer):
        for name, digest in sorted(per_layer[layer].items()):
            h.update(f"{layer}:{name}:{digest};".encode())
    return "sha256:" + h.hexdigest()


def _first_diff(a: np.ndarray, b: np.ndarray) -> dict | None:
    """First expert row (axis 0) where two same-shape arrays differ, with the first column in it.
    Every LayerStats array has the expert axis first, so there is always an axis 0."""
    if a.shape != b.shape:
        return {"row": None, "why": f"shape {list(a.shape)} vs {list(b.shape)}"}
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    if same.all():
        return None
    rows = same.reshape(a.shape[0], -1).all(axis=1)
    row = int(np.flatnonzero(~rows)[0])
    col = int(np.flatnonzero(~same.reshape(a.shape[0], -1)[row])[0])
    av, bv = a.reshape(a.shape[0], -1)[row, col], b.reshape(b.shape[0], -1)[row, col]
    return {"row": row, "column": col if a.ndim > 1 else None, "left": _num(av), "right": _num(bv)}


def _num(x: float) -> float | str:
    return float(x) if np.isfinite(x) else str(float(x))


def _max_diffs(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    finite = np.isfinite(a) & np.isfinite(b)
    if not finite.any():
        return 0.0, 0.0
    d = np.abs(a[finite] - b[finite])
    scale = np.maximum(np.abs(a[finite]), np.abs(b[finite]))
    rel = np.divide(d, scale, out=np.zeros_like(d), where=scale > 0)
    return float(d.max()), float(rel.max())


def compare(left: TelemetryStore, right: TelemetryStore, options: PlanOptions, *,
            require_identical_telemetry: bool = False) -> dict:
    """Parity report of two stores (JSON-ready, deterministic)."""
    for a, b in ((left, right), (right, left)):
        if a.layers() != b.layers():
            raise BadInput(b.path, f"committed layers {b.layers()} differ from {a.path}'s {a.layers()}")
    left_plan, right_plan = make_plan(left, options), make_plan(right, options)
    layers, hashes_l, hashes_r, first = {}, {}, {}, None
    for layer in left.layers():
        sl, sr = left.read(layer), right.read(layer)
        if sl.expert_output_sum.shape != sr.expert_output_sum.shape:
            raise BadInput(right.path, f"layer {layer}: telemetry shape {list(sr.expert_output_sum.shape)} differs "
                                       f"from {left.path}'s {list(sl.expert_output_sum.shape)}")
        hashes_l[layer], hashes_r[layer] = layer_hashes(sl), layer_hashes(sr)
        arrays = {}
        for name in LayerStats.ARRAYS:
            a, b = getattr(sl, name), getattr(sr, name)
            diff = _first_diff(a, b)
            abs_d, rel_d = _max_diffs(a, b)
            arrays[name] = {"equal": diff is None, "first_diff": diff, "max_abs_diff": abs_d, "max_rel_diff": rel_d}
            if diff is not None and first is None:
                first = {"layer": layer, "array": name, **diff}
        pl = set(left_plan.layers[layer].pruned) if layer in left_plan.layers else set()
        pr = set(right_plan.layers[layer].pruned) if layer in right_plan.layers else set()
        layers[str(layer)] = {
            "identical": hashes_l[layer] == hashes_r[layer],
            "tokens": [sl.tokens, sr.tokens],
            "arrays": arrays,
            "pruned_left": sorted(pl), "pruned_right": sorted(pr),
            "only_left": sorted(pl - pr), "only_right": sorted(pr - pl),
        }
    identical = all(v["identical"] for v in layers.values())
    same_prune = all(not v["only_left"] and not v["only_right"] for v in layers.values())
    verdict = "identical" if identical else "equivalent" if same_prune else "different"
    attrs_l, attrs_r = left.attrs, right.attrs
    return {
        "format": "reap-stream-parity",
        "method": options.method, "ratio": options.ratio, "n_prune": options.n_prune, "keep": options.keep,
        "left": _side(left, attrs_l, hashes_l), "right": _side(right, attrs_r, hashes_r),
        "same_model": (attrs_l.get("model") or {}).get("fingerprint") == (attrs_r.get("model") or {}).get("fingerprint"),
        "same_calibration": ((attrs_l.get("calibration") or {}).get("fingerprint")
                             == (attrs_r.get("calibration") or {}).get("fingerprint")),
        "telemetry_identical": identical,
        "prune_sets_identical": same_prune,
        "first_difference": first,
        "layers": layers,
        "verdict": verdict,
        "require_identical_telemetry": require_identical_telemetry,
        "passed": identical or (same_prune and not require_identical_telemetry),
    }


def _side(store: TelemetryStore, attrs: dict, hashes: dict[int, dict[str, str]]) -> dict:
    return {"path": str(store.path), "telemetry_hash": store_hash(hashes),
            "model_fingerprint": (attrs.get("model") or {}).get("fingerprint"),
            "calibration_fingerprint": (attrs.get("calibration") or {}).get("fingerprint"),
            "layer_hashes": {str(k): v for k, v in sorted(hashes.items())}}


def to_markdown(r: dict) -> str:
    """A human summary of a `compare` report."""
    count = next(f"{k} {r[k]}" for k in ("ratio", "n_prune", "keep") if r.get(k) is not None)
    lines = [
        "# Telemetry parity", "",
        f"- verdict: **{r['verdict']}** ({'PASS' if r['passed'] else 'FAIL'}"
        + (", identical telemetry required)" if r["require_identical_telemetry"] else ")"),
        f"- left: `{r['left']['path']}` — {r['left']['telemetry_hash']}",
        f"- right: `{r['right']['path']}` — {r['right']['telemetry_hash']}",
        f"- same model fingerprint: {r['same_model']}; same calibration: {r['same_calibration']}",
        f"- plans compared: {r['method']}, {count}",
    ]
    f = r["first_difference"]
    if f:
        where = f"layer {f['layer']}, `{f['array']}`, expert row {f['row']}"
        if f.get("column") is not None:
            where += f", column {f['column']}"
        lines.append(f"- first difference: {where}: {f.get('left')} vs {f.get('right')}" if "left" in f
                     else f"- first difference: {where}: {f.get('why')}")
    lines += ["", "| layer | telemetry | max abs diff | max rel diff | pruned only left | pruned only right |",
              "|---:|---|---:|---:|---|---|"]
    for layer, v in r["layers"].items():
        abs_d = max(a["max_abs_diff"] for a in v["arrays"].values())
        rel_d = max(a["max_rel_diff"] for a in v["arrays"].values())
        lines.append(f"| {layer} | {'identical' if v['identical'] else 'differs'} | {abs_d:.3g} | {rel_d:.3g} | "
                     f"{_ids(v['only_left'])} | {_ids(v['only_right'])} |")
    return "\n".join(lines) + "\n"


def _ids(ids: list[int]) -> str:
    return ", ".join(map(str, ids)) if ids else "—"
