"""Saliency criteria: one score per expert of a layer, computed from its telemetry sums.

Higher score = more useful = kept. Every criterion is defined for never-routed experts (no NaN):
averages over an empty set are 0, and max_activations stays -inf (ranked below everything).
The table in docs/plan.md gives the formulas; the arrays each one reads are listed in
NEEDS so a store that lacks them is refused before any score is computed.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..telemetry.store import LayerStats


def _per_routed_token(total: np.ndarray, count: np.ndarray) -> np.ndarray:
    # mean over A_j; an empty A_j gives 0, not NaN
    return np.divide(total, count, out=np.zeros_like(total, dtype=np.float64), where=count > 0)


def _ean_ca(st: LayerStats) -> np.ndarray:
    mean_output = st.expert_output_sum / np.maximum(st.frequency, 1.0)[:, None]
    return np.linalg.norm(mean_output, axis=1)


CRITERIA: dict[str, Callable[[LayerStats], np.ndarray]] = {
    "frequency": lambda st: st.frequency.copy(),
    "weighted_frequency_sum": lambda st: st.weighted_frequency_sum.copy(),
    "ean_sum": lambda st: st.ean_sum.copy(),
    "ean_mean": lambda st: _per_routed_token(st.ean_sum, st.frequency),
    "weighted_ean_sum": lambda st: st.weighted_ean_sum.copy(),
    "reap": lambda st: _per_routed_token(st.weighted_ean_sum, st.frequency),
    "ean_ca": _ean_ca,
    "max_activations": lambda st: st.max_activations.copy(),
}

# telemetry arrays each criterion reads (random reads none beyond the expert count)
NEEDS: dict[str, tuple[str, ...]] = {
    "frequency": ("frequency",),
    "weighted_frequency_sum": ("weighted_frequency_sum",),
    "ean_sum": ("ean_sum",),
    "ean_mean": ("ean_sum", "frequency"),
    "weighted_ean_sum": ("weighted_ean_sum",),
    "reap": ("weighted_ean_sum", "frequency"),
    "ean_ca": ("expert_output_sum", "frequency"),
    "max_activations": ("max_activations",),
    "random": ("frequency",),
}

METHODS: tuple[str, ...] = tuple(NEEDS)


def random_scores(layer: int, num_experts: int, seed: int) -> np.ndarray:
    """The `random` baseline: a uniform draw seeded by (seed, layer), so layers differ."""
    return np.random.default_rng([seed, layer]).random(num_experts)


def scores(method: str, st: LayerStats, *, seed: int = 0) -> np.ndarray:
    """Scores of every expert of one layer under `method` (float64, length E)."""
    if method == "random":
        return random_scores(st.layer, st.num_experts, seed)
    return np.asarray(CRITERIA[method](st), dtype=np.float64)


def lacks(method: str, st: LayerStats) -> str | None:
    """Why `st` cannot support `method`, or None. A zero-width expert_output_sum means the
    collector was told not to keep per-expert output sums; never-set max_activations likewise."""
    if method == "ean_ca" and st.expert_output_sum.shape[1] == 0:
        return "ean_ca needs per-expert output sums (expert_output_sum has hidden size 0)"
    if method == "max_activations" and st.frequency.sum() > 0 and not np.isfinite(st.max_activations).any():
        return "max_activations were not recorded (all -inf although experts were routed)"
    return None
