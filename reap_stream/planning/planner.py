"""From telemetry to a checked `Plan`: budgets, constraints, the super-expert guard and reasons.

Ranking: within a layer experts are ordered by (score, expert id) ascending and pruned from the
front, so among equal scores the lower id goes first. Everything is a pure function of the store's
arrays and the options: the same inputs give byte-identical plan JSON (no timestamps, sorted keys).
"""
from __future__ import annotations

import heapq
from dataclasses import asdict, dataclass, field, replace
from typing import Iterable

import numpy as np
from tqdm import tqdm

from .. import __version__
from ..errors import BadInput
from ..families.model import Model
from ..families.structure import MoEStructure, same_kind
from ..telemetry.store import Fingerprint, LayerStats, TelemetryStore, layer_key
from .criteria import METHODS, NEEDS, lacks, scores
from .plan import LayerPlan, Plan, check_plan

BUDGETS = ("uniform", "global")
SUPER_PERCENTILE = 99.5      # CR: torch.quantile(all max activations, 0.995)
SUPER_MAX_FRACTION = 10.0    # CR: or global max / 10, whichever is larger
SUPER_LAYER_FRACTION = 0.75  # CR: only the first 75% of the observed MoE layers

@dataclass(frozen=True)
class PlanOptions:
    method: str
    ratio: float | None = None
    n_prune: int | None = None
    keep: int | None = None
    min_experts: int = 1
    skip_layers: tuple[int, ...] = ()
    preserve_super_experts: bool = True
    budget: str = "uniform"
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "skip_layers", tuple(sorted(set(self.skip_layers))))

    def validate(self) -> None:
        """One line naming the option at fault (the same whether the CLI or a library caller set it)."""
        if self.method not in METHODS:
            raise BadInput("--method", f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        given = [name for name, v in (("--ratio", self.ratio), ("--n-prune", self.n_prune), ("--keep", self.keep))
                 if v is not None]
        if len(given) != 1:
            raise BadInput("--ratio/--n-prune/--keep", "give exactly one of --ratio, --n-prune, --keep"
                           + (f" (got {', '.join(given)})" if given else ""))
        if self.ratio is not None and not (0.0 <= self.ratio < 1.0):
            raise BadInput("--ratio", f"{self.ratio} is outside [0, 1)")
        if self.n_prune is not None and self.n_prune < 0:
            raise BadInput("--n-prune", f"{self.n_prune} is negative")
        if self.keep is not None and self.keep < 1:
            raise BadInput("--keep", f"{self.keep} must be at least 1")
        if self.min_experts < 1:
            raise BadInput("--min-experts", f"{self.min_experts} must be at least 1")
        if self.budget not in BUDGETS:
            raise BadInput("--budget", f"unknown budget {self.budget!r}; choose uniform or global")


@dataclass
class LayerScores:
    layer: int
    scores: np.ndarray
    max_activations: np.ndarray
    super_experts: list[int] = field(default_factory=list)


def parse_layer_spec(spec: str | None, where: str = "--skip-layers") -> tuple[int, ...]:
    """"0,3,10-12" -> (0, 3, 10, 11, 12)."""
    if not spec:
        return ()
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        lo, dash, hi = part.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise BadInput(where, f"cannot read layer spec {spec!r} (e.g. 0,3,10-12)")
        a, b = int(lo), int(hi) if dash else int(lo)
        if b < a:
            raise BadInput(where, f"layer range {part!r} runs backwards")
        out.update(range(a, b + 1))
    return tuple(sorted(out))


def experts_dropped(ratio: float, num_experts: int, n_group: int = 1) -> int:
    """How many of a layer's experts `--ratio` drops (before constraints)."""
    return _requested_drop(PlanOptions("reap", ratio=ratio), num_experts, n_group)


def _requested_drop(o: PlanOptions, num_experts: int, n_group: int) -> int:
    """Experts to drop from one layer of `num_experts`; with groups a ratio rounds down to a
    multiple of n_group (equal drop per group), explicit counts must already divide."""
    if o.ratio is not None:
        n = int(np.floor(num_experts * o.ratio + 1e-9))
        return n - n % n_group
    return o.n_prune if o.n_prune is not None else num_experts - o.keep


def _min_keep(st: MoEStructure, o: PlanOptions) -> int:
    lo = max(st.top_k, o.min_experts, 1)
    if st.n_group > 1:
        per_group = max(2, -(-st.top_k // st.topk_group), -(-lo // st.n_group))
        lo = max(lo, per_group * st.n_group)
    return lo


def super_expert_threshold(max_acts: list[np.ndarray]) -> float:
    """max(99.5th percentile, global max / 10) over every expert of every observed layer (the
    reference's population); never-routed experts (-inf) are left out of the population."""
    pop = np.concatenate([m[np.isfinite(m)] for m in max_acts]) if max_acts else np.zeros(0)
    if pop.size == 0:
        return float("inf")
    return float(max(np.percentile(pop, SUPER_PERCENTILE), pop.max() / SUPER_MAX_FRACTION))


def _order(s: np.ndarray) -> list[int]:
    # ascending score, ties by ascending expert id
    return [int(i) for i in np.lexsort((np.arange(s.size), s))]


def _prune_queue(ls: LayerScores, st: MoEStructure) -> list[list[int]]:
    """Units in the order a layer gives experts up: single experts, or with groups one expert from
    each group at a time (so every group always drops the same number)."""
    protected = set(ls.super_experts)
    order = [e for e in _order(ls.scores) if e not in protected]
    if st.n_group <= 1:
        return [[e] for e in order]
    size = ls.scores.size // st.n_group
    per_group = [[e for e in order if e // size == g] for g in range(st.n_group)]
    depth = min(len(q) for q in per_group)
    return [sorted(q[i] for q in per_group) for i in range(depth)]


def _normalised(s: np.ndarray) -> np.ndarray:
    # global budget: a score as a multiple of its layer's mean |score|, so layers compare
    finite = s[np.isfinite(s)]
    scale = np.abs(finite).mean() if finite.size else 0.0
    return s / scale if scale > 0 else np.where(np.isfinite(s), 0.0, s)


def _drops_uniform(layers: dict[int, LayerScores], st: MoEStructure, o: PlanOptions, where: str) -> dict[int, int]:
    drops = {}
    for layer, ls in layers.items():
        e = ls.scores.size
        n = _requested_drop(o, e, st.n_group)
        _check_drop(layer, e, n, st, o, where)
        unprotected = sum(len(u) for u in _prune_queue(ls, st))
        if n > unprotected:
            raise BadInput(where, f"layer {layer}: {len(ls.super_experts)} super expert(s) are protected, so only {unprotected} "
                                  f"of {e} experts can be pruned, not {n}; lower the ratio or pass --no-preserve-super-experts")
        drops[layer] = n
    return drops


def _check_drop(layer: int, e: int, n: int, st: MoEStructure, o: PlanOptions, where: str) -> None:
    option = (f"--ratio {o.ratio}" if o.ratio is not None else f"--n-prune {o.n_prune}" if o.n_prune is not None
              else f"--keep {o.keep}")
    if n < 0:
        raise BadInput(where, f"layer {layer}: {option} asks to keep more experts than the layer's {e}")
    if n > e:
        raise BadInput(where, f"layer {layer}: {option} asks to prune {n} experts, more than the layer's {e}")
    if st.n_group > 1 and n % st.n_group:
        raise BadInput(where, f"layer {layer}: {option} drops {n} experts, not a multiple of n_group={st.n_group} "
                              "(every group must drop the same number)")
    lo = _min_keep(st, o)
    if e - n < lo:
        why = f"top_k={st.top_k}" + (f", --min-experts={o.min_experts}" if o.min_experts > st.top_k else "")
        if st.n_group > 1:
            why += f", n_group={st.n_group} x >=2 per group, topk_group={st.topk_group}"
        raise BadInput(where, f"layer {layer}: {option} leaves {e - n} experts, fewer than the {lo} needed ({why})")


def _drops_global(layers: dict[int, LayerScores], st: MoEStructure, o: PlanOptions, where: str) -> dict[int, int]:
    """One budget (the uniform plan's total) spent on the lowest per-layer-normalised scores,
    each layer stopping at its minimum keep."""
    budget = 0
    for layer, ls in layers.items():
        e = ls.scores.size
        n = _requested_drop(o, e, st.n_group)
        if n < 0 or n > e:
            _check_drop(layer, e, n, st, o, where)
        budget += n
    queues, heap = {}, []
    for layer, ls in layers.items():
        e = ls.scores.size
        norm = _normalised(ls.scores)
        units, room = _prune_queue(ls, st), e - _min_keep(st, o)
        units = units[: _fit(units, room)]
        queues[layer] = [(float(max(norm[u])), u) for u in units]
        if queues[layer]:
            heapq.heappush(heap, (queues[layer][0][0], layer, 0))
    drops = {layer: 0 for layer in layers}
    spent = 0
    while heap and spent < budget:
        _, layer, i = heapq.heappop(heap)
        unit = queues[layer][i][1]
        if spent + len(unit) > budget:
            continue  # a whole group-unit no longer fits; smaller units elsewhere may
        spent += len(unit)
        drops[layer] += len(unit)
        if i + 1 < len(queues[layer]):
            heapq.heappush(heap, (queues[layer][i + 1][0], layer, i + 1))
    if budget - spent >= st.n_group:  # more than group rounding left over: every layer is at its floor
        raise BadInput(where, f"the global budget of {budget} experts cannot be met: every layer reaches its minimum "
                              f"(top_k / --min-experts / groups / super experts) after {spent}")
    return drops


def _fit(units: list[list[int]], room: int) -> int:
    # how many leading units a layer can give up before reaching its minimum keep
    used, n = 0, 0
    for u in units:
        if used + len(u) > room:
            break
        used, n = used + len(u), n + 1
    return n


def _select(ls: LayerScores, st: MoEStructure, n: int) -> list[int]:
    pruned: list[int] = []
    for unit in _prune_queue(ls, st):
        if len(pruned) >= n:
            break
        pruned.extend(unit)
    return sorted(pruned)


def _num(x: float) -> float | None:
    # JSON has no -inf / NaN: a never-routed expert's max activation is written as null
    return float(x) if np.isfinite(x) else None


def _layer_plan(ls: LayerScores, pruned: list[int], method: str, threshold: float, skipped: bool) -> LayerPlan:
    e = ls.scores.size
    rank = {ex: r + 1 for r, ex in enumerate(_order(ls.scores))}
    gone = set(pruned)
    reasons = []
    for ex in range(e):
        where = f"{method} score rank {rank[ex]} of {e} (1 = lowest)"
        if ex in gone:
            reasons.append(f"pruned: {where}")
        elif skipped:
            reasons.append("kept: layer skipped (--skip-layers)")
        elif ex in ls.super_experts:
            reasons.append(f"kept: super expert (max activation {ls.max_activations[ex]:.6g} > {threshold:.6g})")
        else:
            reasons.append(f"kept: {where}")
    extra = {"scores": [_num(v) for v in ls.scores], "reasons": reasons, "super_experts": list(ls.super_experts)}
    return LayerPlan(kept=[ex for ex in range(e) if ex not in gone], pruned=sorted(gone), extra=extra)


def _read_layer(store: TelemetryStore, layer: int, o: PlanOptions, expected: int, where: str) -> LayerStats:
    for name in NEEDS[o.method]:
        if not (store.path / layer_key(layer) / name).exists():
            raise BadInput(where, f"method {o.method} needs telemetry array {name!r}, which layer {layer} lacks")
    stats = store.read(layer)
    if stats.num_experts != expected:
        raise BadInput(where, f"layer {layer} has telemetry for {stats.num_experts} experts, the model block says {expected}")
    why = lacks(o.method, stats)
    if why:
        raise BadInput(where, f"layer {layer}: method {why}")
    return stats


def make_plan(store: TelemetryStore, o: PlanOptions, *, frozen: Iterable[int] = (), progress: bool = False) -> Plan:
    """Score every committed MoE layer of `store` by the options' method, pick the experts to drop
    under the budget and constraints, and return a checked Plan with scores, reasons and provenance.

    `frozen`: layers to leave whole beyond those the store's model block names (hash/MTP layers
    of the model, when it is at hand).
    """
    where = str(store.path)
    o.validate()
    attrs = store.attrs
    if not isinstance(attrs.get("model"), dict):
        raise BadInput(where, "telemetry has no 'model' attributes (not written by collect/init?)")
    st = MoEStructure.from_json(attrs["model"], where)
    frozen = set(st.frozen_layers) | set(frozen)
    committed = store.layers()
    if not committed:
        raise BadInput(where, "telemetry has no committed layers")
    for layer in committed:
        if layer not in st.layer_experts:
            raise BadInput(where, f"telemetry holds layer {layer}, which is not an MoE layer of the model")
    prunable = [layer for layer in st.moe_layers if layer not in frozen]
    missing = [layer for layer in prunable if layer not in committed]
    if missing:
        raise BadInput(where, f"layer {missing[0]} has no committed telemetry ({len(missing)} missing; rerun collect to finish)")
    bad_skip = [layer for layer in o.skip_layers if layer not in st.layer_experts]
    if bad_skip:
        raise BadInput(where, f"--skip-layers names layer {bad_skip[0]}, which is not an MoE layer")

    observed = {}
    fp = Fingerprint()  # committed layers come ascending, as TelemetryStore.fingerprint hashes them
    # a bar only on a terminal, erased when done: a refusal stays the one line on stderr
    for layer in tqdm(committed, desc="plan", unit="layer", leave=False, disable=None if progress else True):
        stats = _read_layer(store, layer, o, st.layer_experts[layer], where)
        fp.add(stats)
        observed[layer] = LayerScores(layer, scores(o.method, stats, seed=o.seed), stats.max_activations)

    threshold = super_expert_threshold([ls.max_activations for ls in observed.values()])
    guarded = committed[: int(len(committed) * SUPER_LAYER_FRACTION)]
    if o.preserve_super_experts:
        for layer in guarded:
            ls = observed[layer]
            ls.super_experts = [int(e) for e in np.flatnonzero(ls.max_activations > threshold)]

    planned = {layer: observed[layer] for layer in prunable if layer not in o.skip_layers}
    drops = (_drops_uniform if o.budget == "uniform" else _drops_global)(planned, st, o, where)
    layers = {}
    for layer in prunable:
        ls = observed[layer]
        skipped = layer in o.skip_layers
        pruned = [] if skipped else _select(ls, st, drops[layer])
        layers[layer] = _layer_plan(ls, pruned, o.method, threshold, skipped)

    total = sum(len(lp.kept) + len(lp.pruned) for lp in layers.values())
    gone = sum(len(lp.pruned) for lp in layers.values())
    calib = attrs.get("calibration") or {}
    plan = Plan(
        layers=layers, method=o.method,
        ratio=o.ratio if o.ratio is not None else round(gone / max(total, 1), 6),
        model=dict(attrs["model"]),
        # no store path: the same store named relatively or absolutely must give the same plan bytes
        telemetry={"fingerprint": fp.hexdigest(), "calibration": calib.get("fingerprint")},
        extra={"provenance": {
            "tool_version": __version__,
            "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(o).items()},
            "pruned_experts": gone, "routed_experts": total,
            "super_expert_threshold": _num(threshold),
            "super_expert_layers": guarded if o.preserve_super_experts else [],
            "untouched_layers": sorted(frozen & set(st.layer_experts)),
            "calibration": {k: calib.get(k) for k in ("fingerprint", "num_tokens", "source") if k in calib},
            "routing": attrs.get("routing"),
            "ranking": "ascending score, ties by ascending expert id; lowest pruned first",
        }})
    check_plan(plan, replace(st, frozen_layers=sorted(frozen)), where, min_experts=o.min_experts)
    return plan


def check_store_model(store: TelemetryStore, model: Model) -> None:
    """Refuse telemetry collected on another model than `model` (fingerprint, then structure)."""
    recorded = store.attrs.get("model") or {}
    fp = recorded.get("fingerprint") if isinstance(recorded, dict) else None
    if not isinstance(fp, str) or (same_kind(fp, model.fingerprint) and fp != model.fingerprint):
        raise BadInput(store.path, f"telemetry was collected on another model (fingerprint "
                                   f"{str(fp)[:19]}…, {model.path} is {str(model.fingerprint)[:19]}…)")
    shape = model.structure.to_json()
    for key in ("model_type", "moe_layers", "num_experts", "top_k"):
        if recorded.get(key) != shape[key]:
            raise BadInput(store.path, f"telemetry {key} {recorded.get(key)!r} differs from {model.path}'s {shape[key]!r}")
