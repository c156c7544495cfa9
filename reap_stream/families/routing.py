"""Exact routing per family: which experts a block selects for each token and how it weighs them.

The router's logits come from the model's own router module; what happens next (softmax or
sigmoid, bias for selection only, group limits, top-k, renormalisation, scaling) is one function
per `Routing` kind in `ROUTERS`, written to match mlx_lm's blocks op for op; the family row says
which kind, how the block spells its top-k, and which shared experts it adds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx

from .table import Family, Routing


@dataclass
class Routed:
    """How the block routes a [T, D] input: what it selects and how it weighs the selection."""

    inds: mx.array     # [T, k] selected experts
    weights: mx.array  # [T, k] weights the block multiplies expert outputs by
    probs: mx.array    # [T, E] float32 full router probabilities (softmax, or sigmoid scores)


def _top_low(scores: mx.array, k: int) -> mx.array:
    return mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k]


def _top_high(scores: mx.array, k: int) -> mx.array:
    return mx.argpartition(scores, kth=-k, axis=-1)[..., -k:]


# How a block spells its top-k (Family.top_k). Both give the same set except among exactly tied
# scores, which half-precision probabilities produce often enough to matter.
TOP_K: dict[str, Callable[[mx.array, int], mx.array]] = {"low": _top_low, "high": _top_high}


def _top_k(fam: Family, scores: mx.array, k: int) -> mx.array:
    return TOP_K[fam.top_k](scores, k)


def _softmax_topk(block, fam: Family, x: mx.array, k: int) -> Routed:
    # Qwen2/3-MoE, OLMoE: softmax over all experts, top-k, renormalise if the block says so.
    gates = mx.softmax(getattr(block, fam.router)(x), axis=-1, precise=True)
    inds = _top_k(fam, gates, k)
    scores = mx.take_along_axis(gates, inds, axis=-1)
    if getattr(block, "norm_topk_prob", False):
        scores = scores / mx.sum(scores, axis=-1, keepdims=True)
    return Routed(inds, scores, gates.astype(mx.float32))


def _topk_softmax(block, fam: Family, x: mx.array, k: int) -> Routed:
    # Mixtral, gpt-oss: top-k on the raw logits (router bias included), softmax over the k.
    logits = getattr(block, fam.router)(x)
    inds = _top_k(fam, logits, k)
    scores = mx.softmax(mx.take_along_axis(logits, inds, axis=-1), axis=-1, precise=True)
    return Routed(inds, scores, mx.softmax(logits.astype(mx.float32), axis=-1))


def _sigmoid_group(block, fam: Family, x: mx.array, k: int) -> Routed:
    # DeepSeek-V3, GLM-4.5: sigmoid scores; the correction bias steers selection only; with
    # n_group > 1 each group scores by its top-2 sum and losing groups are zero-filled (as
    # mlx_lm does: 0.0, not -inf); weights are the unbiased scores (renormalised) * scaling.
    gate = getattr(block, fam.router)
    scores = mx.sigmoid((x @ gate.weight.T).astype(mx.float32))
    select = scores + gate.e_score_correction_bias
    if gate.n_group > 1:
        select = mx.unflatten(select, axis=-1, shape=(gate.n_group, -1))
        group_scores = mx.topk(select, 2, axis=-1).sum(axis=-1, keepdims=True)
        losers = gate.n_group - gate.topk_group
        group_idx = mx.argpartition(group_scores, kth=losers - 1, axis=-2)[..., :losers, :]
        select = mx.put_along_axis(select, group_idx, mx.array(0.0), axis=-2)
        select = mx.flatten(select, -2, -1)
    inds = _top_k(fam, select, k)
    weights = mx.take_along_axis(scores, inds, axis=-1)
    if k > 1 and gate.norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return Routed(inds, weights * gate.routed_scaling_factor, scores)


ROUTERS: dict[Routing, Callable[..., Routed]] = {
    Routing.SOFTMAX_TOPK: _softmax_topk,
    Routing.TOPK_SOFTMAX: _topk_softmax,
    Routing.SIGMOID_GROUP: _sigmoid_group,
}


def shared_output(block, fam: Family, x: mx.array) -> mx.array | None:
    """What the block adds beside the routed experts: its shared experts, unweighted by the router
    (Qwen2-MoE scales its shared expert by a sigmoid gate of its own, Family.shared_gate)."""
    if fam.shared is None or not hasattr(block, fam.shared):
        return None
    out = getattr(block, fam.shared)(x)
    if fam.shared_gate is not None:
        out = mx.sigmoid(getattr(block, fam.shared_gate)(x)) * out
    return out
