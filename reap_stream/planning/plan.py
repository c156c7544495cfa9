"""Pruning plan, schema v1: which original expert ids each MoE layer keeps.

A plan is JSON (see docs/plan-schema.md):

    {"format": "reap-stream-plan", "schema_version": 1,
     "method": "reap", "ratio": 0.5,
     "model": {"model_type": ..., "num_layers": ..., "num_experts": ..., "top_k": ...,
               "moe_layers": [...], "fingerprint": "sha256:..."},
     "telemetry": {"fingerprint": "sha256:...", ...} | null,
     "layers": {"1": {"kept": [...], "pruned": [...], ...}, ...},
     ...}

Layers a plan does not list keep all their experts. Extra per-layer keys (scores, reasons) are
carried through untouched.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadInput
from ..families.structure import MoEStructure, same_kind
from ..io.files import write_text_atomic
from ..io.reading import is_index, read_json

PLAN_FORMAT = "reap-stream-plan"
PLAN_SCHEMA_VERSION = 1


def kept_runs(ids: list[int]) -> list[tuple[int, int]]:
    """Ascending expert ids as (first, count) runs, so adjacent kept experts copy as one range."""
    runs: list[tuple[int, int]] = []
    for e in ids:
        if runs and runs[-1][0] + runs[-1][1] == e:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((e, 1))
    return runs


@dataclass
class LayerPlan:
    kept: list[int]
    pruned: list[int]
    extra: dict = field(default_factory=dict)


@dataclass
class Plan:
    layers: dict[int, LayerPlan]
    method: str = "manual"
    ratio: float | None = None
    model: dict = field(default_factory=dict)
    telemetry: dict | None = None
    extra: dict = field(default_factory=dict)

    @property
    def uniform(self) -> bool:
        return len({len(lp.kept) for lp in self.layers.values()}) <= 1

    def pruned_map(self) -> dict[int, list[int]]:
        return {i: list(lp.pruned) for i, lp in self.layers.items()}

    def kept_map(self) -> dict[int, list[int]]:
        return {i: list(lp.kept) for i, lp in self.layers.items()}

    def to_json(self) -> dict:
        out = {
            "format": PLAN_FORMAT,
            "schema_version": PLAN_SCHEMA_VERSION,
            "method": self.method,
            "ratio": self.ratio,
            "model": self.model,
            "telemetry": self.telemetry,
            "layers": {str(i): {"kept": lp.kept, "pruned": lp.pruned, **lp.extra}
                       for i, lp in sorted(self.layers.items())},
        }
        out.update(self.extra)
        return out

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n"

    def save(self, path: str | Path) -> None:
        write_text_atomic(Path(path), self.dumps())

    @classmethod
    def from_json(cls, data: object, where: str = "plan") -> "Plan":
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise BadInput(where, f"not a reap-stream plan (format must be {PLAN_FORMAT!r})")
        if data.get("schema_version") != PLAN_SCHEMA_VERSION:
            raise BadInput(where, f"plan schema_version {data.get('schema_version')!r} is not supported (expected {PLAN_SCHEMA_VERSION})")
        layers_in = data.get("layers")
        if not isinstance(layers_in, dict):
            raise BadInput(where, "plan has no 'layers' object")
        layers: dict[int, LayerPlan] = {}
        for key, entry in layers_in.items():
            if not (is_index(key) and str(int(key)) == key):
                raise BadInput(where, f"layer key {key!r} is not a layer index (write it as e.g. \"7\")")
            if not isinstance(entry, dict):
                raise BadInput(where, f"layer {key}: entry is not an object")
            kept, pruned = entry.get("kept"), entry.get("pruned")
            for label, ids in (("kept", kept), ("pruned", pruned)):
                if not isinstance(ids, list) or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in ids):
                    raise BadInput(where, f"layer {key}: '{label}' must be a list of expert ids")
            if len(set(kept)) != len(kept) or len(set(pruned)) != len(pruned):
                raise BadInput(where, f"layer {key}: an expert id is listed twice")
            both = sorted(set(kept) & set(pruned))
            if both:
                raise BadInput(where, f"layer {key}: expert {both[0]} is both kept and pruned")
            extra = {k: v for k, v in entry.items() if k not in ("kept", "pruned")}
            layers[int(key)] = LayerPlan(sorted(kept), sorted(pruned), extra)
        for name in ("model", "telemetry"):
            if data.get(name) is not None and not isinstance(data[name], dict):
                raise BadInput(where, f"'{name}' must be an object or null")
        _check_model_block(data.get("model") or {}, where)
        ratio, method = data.get("ratio"), data.get("method", "manual")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))):
            raise BadInput(where, f"'ratio' must be a number or null, not {type(ratio).__name__}")
        if not isinstance(method, str):
            raise BadInput(where, f"'method' must be a string, not {type(method).__name__}")
        known = {"format", "schema_version", "method", "ratio", "model", "telemetry", "layers"}
        return cls(layers=layers, method=method, ratio=ratio,
                   model=data.get("model") or {}, telemetry=data.get("telemetry"),
                   extra={k: v for k, v in data.items() if k not in known})

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        return cls.from_json(read_json(path, "JSON", missing="plan file not found"), str(path))


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# what a plan's `model` block may hold, and the type each entry must have when present
_MODEL_FIELDS = {
    "model_type": (lambda v: isinstance(v, str), "a string"),
    "fingerprint": (lambda v: v is None or isinstance(v, str), "a string"),
    "num_layers": (_is_int, "an integer"),
    "top_k": (_is_int, "an integer"),
    "n_group": (lambda v: v is None or _is_int(v), "an integer"),
    "topk_group": (lambda v: v is None or _is_int(v), "an integer"),
    "moe_layers": (lambda v: isinstance(v, list) and all(_is_int(i) for i in v), "a list of layer numbers"),
    "frozen_layers": (lambda v: isinstance(v, list) and all(_is_int(i) for i in v), "a list of layer numbers"),
    "num_experts": (lambda v: _is_int(v) or (isinstance(v, dict)
                                              and all(is_index(k) and _is_int(n) for k, n in v.items())),
                    "an integer or a map of layer -> integer"),
}


def _check_model_block(model: dict, where: str) -> None:
    for key, (ok, want) in _MODEL_FIELDS.items():
        if key in model and not ok(model[key]):
            raise BadInput(where, f"model.{key} must be {want}, not {model[key]!r:.60}")


# ------------------------------------------------------------------ fit to a model

def check_plan(plan: Plan, st: MoEStructure, where: str, *, model_fingerprint: str | None = None,
               min_experts: int = 1) -> None:
    """Raise BadInput unless `plan` can be applied to a model of structure `st`."""
    pm = plan.model or {}
    if pm.get("model_type") not in (None, st.model_type):
        raise BadInput(where, f"plan is for model_type {pm['model_type']!r}, the model is {st.model_type!r}")
    have, decoder = st.to_json(), st.decoder_only().to_json()   # a form may drop NextN/MTP blocks
    for key, label in (("num_layers", "layers"), ("moe_layers", "MoE layers"), ("num_experts", "experts"),
                       ("top_k", "top_k")):
        if key in pm and pm[key] not in (have[key], decoder[key]):
            raise BadInput(where, f"plan is for a model with {label} {pm[key]}, the model has {have[key]}")
    planned = pm.get("fingerprint")
    if model_fingerprint and planned and same_kind(planned, model_fingerprint) and planned != model_fingerprint:
        raise BadInput(where, f"plan was made for another model (fingerprint {pm['fingerprint'][:19]}…, "
                              f"this model {model_fingerprint[:19]}…); pass --ignore-fingerprint to apply by structure")
    if not plan.layers:
        raise BadInput(where, "plan lists no layers")
    for layer, lp in sorted(plan.layers.items()):
        if layer in st.frozen_layers:
            raise BadInput(where, f"layer {layer} routes by a fixed table (hash/MTP) and cannot be pruned")
        if layer not in st.layer_experts:
            raise BadInput(where, f"layer {layer} is not an MoE layer of this model (MoE layers: {_span(st.moe_layers)})")
        n = st.layer_experts[layer]
        ids = set(lp.kept) | set(lp.pruned)
        out_of_range = sorted(e for e in ids if e >= n)
        if out_of_range:
            raise BadInput(where, f"layer {layer}: expert {out_of_range[0]} does not exist (layer has {n} experts)")
        if len(ids) != n:
            missing = sorted(set(range(n)) - ids)
            raise BadInput(where, f"layer {layer}: expert {missing[0]} is neither kept nor pruned")
        k = len(lp.kept)
        if k < max(st.top_k, min_experts, 1):
            raise BadInput(where, f"layer {layer}: keeps {k} experts, fewer than top_k={st.top_k}"
                                  + (f" / --min-experts={min_experts}" if min_experts > st.top_k else ""))
        if st.n_group > 1:
            _check_groups(layer, lp.kept, n, st, where)


def _check_groups(layer: int, kept: list[int], n: int, st: MoEStructure, where: str) -> None:
    size = n // st.n_group
    per_group = [sum(1 for e in kept if e // size == g) for g in range(st.n_group)]
    if len(set(per_group)) != 1:
        raise BadInput(where, f"layer {layer}: n_group={st.n_group} needs the same number kept in every group, plan keeps {per_group}")
    if per_group[0] < 2:
        raise BadInput(where, f"layer {layer}: keeps {per_group[0]} expert per group; group scoring needs at least 2")
    if st.topk_group * per_group[0] < st.top_k:
        raise BadInput(where, f"layer {layer}: topk_group={st.topk_group} x {per_group[0]} kept per group < top_k={st.top_k}")


def _span(ids: list[int]) -> str:
    if ids and ids == list(range(ids[0], ids[-1] + 1)) and len(ids) > 2:
        return f"{ids[0]}-{ids[-1]}"
    return ",".join(map(str, ids))
