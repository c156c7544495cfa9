"""Exact routing per family: which experts a block selects for each token and how it weighs them.

The router's logits come from the model's own router module (or its raw weight); what happens next
is `scored` for the three scored kinds (softmax, top-k-then-softmax, sigmoid with selection bias
and groups), driven by the row's `Route` parameters and written to match mlx_lm's blocks op for
op, and one function per genuinely different kind (Llama-4's input-scaling top-1, PhiMoE's
sparsemixer) in `ROUTERS`. The family row says which kind, how the block spells its top-k, and
which shared experts it adds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from ..errors import BadInput
from .table import At, Family, Route, Routing, attr


@dataclass
class Routed:
    """How the block routes a [T, D] input: what it selects and how it weighs the selection."""

    inds: mx.array     # [T, k] selected experts
    weights: mx.array  # [T, k] weights the block multiplies expert outputs by
    probs: mx.array    # [T, E] float32 full router probabilities (softmax, or sigmoid scores)
    input_scale: mx.array | None = None  # [T, k]: the expert's input is x * scale (Llama-4)


def _top_low(scores: mx.array, k: int) -> mx.array:
    return mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k]


def _top_high(scores: mx.array, k: int) -> mx.array:
    return mx.argpartition(scores, kth=-k, axis=-1)[..., -k:]


# How a block spells its top-k (Family.top_k). Both give the same set except among exactly tied
# scores, which half-precision probabilities produce often enough to matter.
TOP_K: dict[str, Callable[[mx.array, int], mx.array]] = {"low": _top_low, "high": _top_high}


def _top_k(fam: Family, scores: mx.array, k: int) -> mx.array:
    return TOP_K[fam.top_k](scores, k)


def param(block, value):
    """A Route value: a constant, or read from the block (At)."""
    if not isinstance(value, At):
        return value
    try:
        return attr(block, value.path) if value.required else attr(block, value.path, value.default)
    except AttributeError:
        raise BadInput("model", f"MoE block {type(block).__name__} has no {value.path!r} "
                                f"(the family row reads its routing from it)") from None


def selection_bias(block, route: Route):
    """The block's selection-only bias (None when the route has none or the block has none)."""
    return attr(block, route.bias, None) if route.bias else None


def score_fn(block, route: Route):
    """The score function the block applies: a name, or the block's own activation module."""
    return param(block, route.score)


def _logits(block, fam: Family, x: mx.array) -> mx.array:
    router = attr(block, fam.router)
    how = fam.route.logits
    if how == "router":
        return router(x)
    if how == "router_f32_input":
        return router(x.astype(mx.float32))
    weight = router.weight
    if "reap_column" in router:  # a masked raw-weight gate (families/masking.py): x' = [x, 1]
        x = mx.concatenate([x, mx.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)
        weight = mx.concatenate([weight, router.reap_column], axis=1)
    if how == "weight":
        return x @ weight.T
    if how == "weight_f32":
        return x.astype(mx.float32) @ weight.astype(mx.float32).T
    raise ValueError(f"unknown logits {how!r}")


def _score(fn, logits: mx.array, precise: bool) -> mx.array:
    if isinstance(fn, nn.Module):
        return fn(logits)
    if fn == "softmax":
        return mx.softmax(logits, axis=-1, precise=precise)
    if fn == "sigmoid":
        return mx.sigmoid(logits)
    if fn == "sqrtsoftplus":
        return mx.sqrt(nn.softplus(logits))
    raise BadInput("model", f"unsupported router score function {fn!r}")


def _limit_groups(block, route: Route, select: mx.array) -> mx.array:
    """Group-limited selection: only the best topk_group groups (by their top-2 sum or max) stay
    eligible; the others are filled with route.group_fill."""
    if route.groups is None:
        return select
    if route.group_if is not None and attr(block, route.group_if[0], None) != route.group_if[1]:
        return select
    n, keep = int(param(block, route.n_group)), int(param(block, route.topk_group))
    if n <= 1 or keep >= n:
        return select  # no losing group: the grouped path leaves every score as it is
    grouped = mx.unflatten(select, axis=-1, shape=(n, -1))
    if route.groups == "top2sum":
        group_scores = mx.topk(grouped, 2, axis=-1).sum(axis=-1, keepdims=True)
    else:
        group_scores = grouped.max(axis=-1, keepdims=True)
    losers = n - keep
    group_idx = mx.argpartition(group_scores, kth=losers - 1, axis=-2)[..., :losers, :]
    grouped = mx.put_along_axis(grouped, group_idx, mx.array(route.group_fill, grouped.dtype), axis=-2)
    return mx.flatten(grouped, -2, -1)


def _renorm(block, route: Route, w: mx.array, k: int) -> mx.array:
    if route.renorm is None or (k == 1 and not route.renorm_k1) or not param(block, route.renorm_if):
        return w
    total = w.sum(axis=-1, keepdims=True) if route.renorm != "l1" else None
    if route.renorm == "sum":
        return w / (total + route.renorm_eps if route.renorm_eps else total)
    if route.renorm == "max":
        return w / mx.maximum(total, route.renorm_eps)
    if route.renorm == "l1":
        return w / mx.linalg.norm(w, ord=1, axis=-1, keepdims=True)
    raise ValueError(f"unknown renorm {route.renorm!r}")


def scored(block, fam: Family, x: mx.array, k: int) -> Routed:
    """SOFTMAX_TOPK, TOPK_SOFTMAX and SIGMOID_GROUP, from the row's Route, op for op as the block."""
    route = fam.route
    logits = _logits(block, fam, x)
    fn = score_fn(block, route)
    if fn == "logits":  # top-k on the raw logits, softmax over the k
        inds = _top_k(fam, logits, k)
        chosen = mx.take_along_axis(logits, inds, axis=-1)
        weights = mx.softmax(chosen.astype(mx.float32) if route.f32 else chosen, axis=-1, precise=route.precise)
        probs = mx.softmax(logits.astype(mx.float32), axis=-1)
    else:
        logits = logits.astype(mx.float32) if route.f32 else logits
        cap = param(block, route.softcap)
        if cap:
            logits = mx.tanh(logits / cap) * cap
        scores = _score(fn, logits, route.precise)
        select = scores
        bias = selection_bias(block, route)
        if bias is not None:
            select = scores + (bias.astype(scores.dtype) if route.bias_cast else bias)
        select = _limit_groups(block, route, select)
        inds = _top_k(fam, select, k)
        weights = _renorm(block, route, mx.take_along_axis(scores, inds, axis=-1), k)
        probs = scores.astype(mx.float32)
    scale = param(block, route.scale)
    if scale is not None:
        weights = weights * scale
    if route.post_scale:
        weights = weights * attr(block, route.post_scale)[inds]
    return Routed(inds, weights, probs)


def _top1_sigmoid_input(block, fam: Family, x: mx.array, k: int) -> Routed:
    # Llama-4: top-1 on the raw logits; sigmoid(logit) in float32, cast to x's dtype, multiplies
    # the expert's INPUT; the output is added unweighted. probs: sigmoid of every logit.
    logits = _logits(block, fam, x)
    inds = _top_k(fam, logits, k)
    scale = mx.sigmoid(mx.take_along_axis(logits, inds, axis=-1).astype(mx.float32)).astype(x.dtype)
    return Routed(inds, mx.ones(inds.shape, mx.float32), mx.sigmoid(logits.astype(mx.float32)), input_scale=scale)


def _sparsemixer(block, fam: Family, x: mx.array, k: int) -> Routed:
    # PhiMoE (the inference path of HF's sparsemixer): k rounds; each takes the argmax of the
    # still-eligible logits and weighs it by a softmax over the logits within the jitter band
    # around that maximum; the winner is then made ineligible. probs: softmax of the logits.
    gates = _logits(block, fam, x)
    jitter = float(param(block, At("jitter_eps")))
    masked = gates
    inds, weights = [], []
    for _ in range(k):
        top = masked.max(axis=-1, keepdims=True)
        ind = mx.argmax(masked, axis=-1, keepdims=True)
        factor = mx.maximum(mx.abs(gates), top)
        band = mx.where((top - gates) / factor > 2 * jitter, -mx.inf, masked)
        weights.append(mx.take_along_axis(mx.softmax(band, axis=-1, precise=True), ind, axis=-1))
        inds.append(ind)
        masked = mx.put_along_axis(masked, ind, mx.array(-mx.inf, masked.dtype), axis=-1)
    return Routed(mx.concatenate(inds, axis=-1), mx.concatenate(weights, axis=-1),
                  mx.softmax(gates.astype(mx.float32), axis=-1))


ROUTERS: dict[Routing, Callable[..., Routed]] = {
    Routing.SOFTMAX_TOPK: scored,
    Routing.TOPK_SOFTMAX: scored,
    Routing.SIGMOID_GROUP: scored,
    Routing.TOP1_SIGMOID_INPUT: _top1_sigmoid_input,
    Routing.SPARSEMIXER: _sparsemixer,
}


def shared_output(block, fam: Family, x: mx.array) -> mx.array | None:
    """What the block adds beside the routed experts: its shared experts, unweighted by the router
    (Qwen2-MoE scales its shared expert by a sigmoid gate of its own, Family.shared_gate)."""
    if fam.shared is None or getattr(block, fam.shared, None) is None:
        return None
    out = getattr(block, fam.shared)(x)
    if fam.shared_gate is not None:
        out = mx.sigmoid(getattr(block, fam.shared_gate)(x)) * out
    return out


def combine(block, fam: Family, x: mx.array, routed: mx.array) -> mx.array:
    """The block's output from its routed experts' weighted sum: plus the shared experts, or
    (Klear, Family.shared_mix) both mixed by a softmax of a Linear of x."""
    shared = shared_output(block, fam, x)
    if fam.shared_mix is not None:
        coef = mx.softmax(getattr(block, fam.shared_mix)(x), axis=-1, precise=True)
        return routed * coef[..., :1] + shared * coef[..., 1:]
    return routed if shared is None else routed + shared
