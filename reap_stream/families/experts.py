"""The MoE capture: a block's routed experts evaluated grouped by expert, its output rebuilt
from them, and the self-check against the block's own forward.

`capture` routes exactly (families/routing.py), then runs the routed experts grouped by expert
(one dense or quantised matmul per expert instead of mlx_lm's per-token gather loop) and rebuilds
the block's output from them, so the same pass yields the block output for the next layer and the
per-expert outputs the telemetry needs. `self_check` compares that output with the block's own
forward: routing captured by hand is easy to get wrong, so every layer is checked on its first
chunk (docs/routing.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np

from ..blas import blas_threads, lane_threads
from ..errors import BadInput
from .routing import ROUTERS, Routed, combine
from .stacks import expert_forward, out_dims, projections
from .stacks import parameters as stack_parameters
from .table import Family, attr

def _expert_linear(lin, e: int, x: mx.array) -> mx.array:
    """x @ W_e^T (+ b_e) for expert e of a (Quantized)SwitchLinear, as one dense matmul."""
    if "scales" in lin:
        if getattr(lin, "global_scale", None) is not None:
            raise BadInput("model", "experts quantised with a global scale (nvfp4 per-expert) are not supported")
        biases = lin.get("biases")
        y = mx.quantized_matmul(x, lin["weight"][e], lin["scales"][e], None if biases is None else biases[e],
                                transpose=True, group_size=lin.group_size, bits=lin.bits, mode=lin.mode)
    else:
        # gather_mm/matmul on the CPU backend are float32-only for expert stacks: upcast per slice.
        y = x.astype(mx.float32) @ lin["weight"][e].astype(mx.float32).T
    if "bias" in lin:
        y = y + lin["bias"][e].astype(y.dtype)
    return y


@dataclass
class ExpertBatch:
    """Routed (token, slot) pairs sorted by expert, with each pair's expert output."""

    order: np.ndarray    # [T*k] flat (token*k + slot) indices, grouped by expert, stable
    experts: np.ndarray  # [T*k] expert of each sorted pair
    bounds: np.ndarray   # [E+1] segment start of each expert in the sorted order
    outputs: np.ndarray  # [T*k, D] float32 un-gated expert outputs f_e(x_t), in sorted order


# Runs two callables at once (on two MLX CPU streams) and returns both results: runner.Lanes.both
Pair = Callable[[Callable, Callable], tuple]


def _two_shares(active: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive experts split where half the routed rows lie on each side."""
    cum = np.cumsum(rows)
    cut = int(np.searchsorted(cum, cum[-1] / 2)) + 1 if len(cum) else 0
    return active[:cut], active[cut:]


def run_experts(switch, x: mx.array, inds: np.ndarray, num_experts: int,
                weights: np.ndarray, pair: Pair | None = None,
                input_scale: np.ndarray | None = None) -> tuple[ExpertBatch, mx.array]:
    """Every routed expert output f_e(x_t), one dense matmul chain per expert, and the weighted
    sum Σ_k w·f(x) per token (`weights` [T, k]) in float32.

    Experts are evaluated one after another, so the working set is one expert's rows plus the
    outputs, not the k-fold expansion of the whole chunk at once. With `pair`, on the CPU and
    where the lanes call the BLAS single-threaded (blas.lane_threads), the experts are shared out
    to two lanes (MLX's CPU element-wise kernels use one core per stream). The BLAS thread count
    of the expert matmuls depends on that configuration alone, not on whether a pair was given, so
    every mode computes every expert with the same calls and gets the same bits. With
    `input_scale` ([T, k]) expert e sees x_t * scale (Llama-4).
    """
    projections(switch)  # a known stack form, or one line saying it is not
    k = inds.shape[1]
    flat = inds.reshape(-1)
    order = np.argsort(flat, kind="stable")
    experts = flat[order]
    bounds = np.searchsorted(experts, np.arange(num_experts + 1))
    order, experts = order[:bounds[-1]], experts[:bounds[-1]]  # ids past the stack: identity experts
    tokens = (order // k).astype(np.int32)
    outputs = np.empty((len(order), out_dims(switch)), np.float32)
    scale_sorted = None if input_scale is None else input_scale.reshape(-1)[order]

    def share(ids: np.ndarray) -> Callable[[], None]:
        def run() -> None:
            for e in map(int, ids):
                lo, hi = int(bounds[e]), int(bounds[e + 1])
                xe = x[mx.array(tokens[lo:hi])]
                if input_scale is not None:
                    xe = xe * mx.array(scale_sorted[lo:hi, None]).astype(x.dtype)
                out = expert_forward(switch, e, xe, _expert_linear).astype(mx.float32)
                outputs[lo:hi] = np.array(out)
        return run

    active = np.flatnonzero(np.diff(bounds))
    first, second = _two_shares(active, np.diff(bounds)[active])
    threads = lane_threads() if mx.default_device() == mx.cpu else None
    with blas_threads(threads):
        if pair is not None and threads == 1:
            mx.eval(x, stack_parameters(switch))  # the other lane cannot run work queued on this thread's stream
            pair(share(first), share(second))
        else:
            share(first)()
            share(second)()
    w_sorted = weights.reshape(-1)[order].astype(np.float32)
    y = mx.array(_weighted_sum(outputs, w_sorted, tokens, bounds, inds.shape[0]))
    return ExpertBatch(order, experts, bounds, outputs), y


def _weighted_sum(outputs: np.ndarray, w_sorted: np.ndarray, tokens: np.ndarray, bounds: np.ndarray,
                  num_tokens: int) -> np.ndarray:
    """Σ_k w·f(x) per token in float32: from 0.0, each token's terms added in ascending expert
    order (fixed, so the bits do not depend on how the experts were shared out). A token is
    routed to an expert at most once, so one expert's rows never repeat a token."""
    y = np.zeros((num_tokens, outputs.shape[1]), np.float32)
    for e in np.flatnonzero(np.diff(bounds)):
        lo, hi = bounds[e], bounds[e + 1]
        y[tokens[lo:hi]] += outputs[lo:hi] * w_sorted[lo:hi, None]
    return y


@dataclass
class Capture:
    """One chunk seen by one MoE block."""

    x: mx.array            # [T, D] block input
    routed: Routed
    inds: np.ndarray       # [T, k] int64
    batch: ExpertBatch
    output: mx.array       # [T, D] block output rebuilt from the experts (+ shared), x's dtype


def capture(block, fam: Family, x: mx.array, top_k: int, num_experts: int, pair: Pair | None = None,
            routed: Routed | None = None) -> Capture:
    """Route x [T, D] exactly as `block` does (or take `routed`, the model's own router's choice)
    and evaluate its experts grouped by expert (shared out to two lanes with `pair`; the same bits
    either way)."""
    routed = routed or ROUTERS[fam.routing](block, fam, x, top_k)
    mx.eval(x, routed.inds, routed.weights, routed.probs)
    inds = np.array(routed.inds).astype(np.int64)
    weights = np.array(routed.weights.astype(mx.float32))
    scale = None if routed.input_scale is None else np.array(routed.input_scale.astype(mx.float32))
    into, out_of = _latent(block, fam)
    batch, y = run_experts(attr(block, fam.stacked), into(x), inds, num_experts, weights, pair, scale)
    y = out_of(y.astype(x.dtype))
    if fam.identity_experts is not None:  # LongCat: ids past the routed experts add w * x
        identity = mx.array(np.where(inds >= num_experts, weights, 0.0).sum(axis=1, keepdims=True))
        y = y + x * identity.astype(x.dtype)
    y = combine(block, fam, x, y)
    mx.eval(y)
    return Capture(x, routed, inds, batch, y)


def _latent(block, fam: Family) -> tuple[Callable, Callable]:
    """The projections into and out of the experts' latent space (identity where none), the way
    out through the norm of the weighted sum where the block has one (Kimi-K3)."""
    if not fam.latent:
        return (lambda a: a), (lambda a: a)
    into, out, *norm = [getattr(block, m, None) for m in fam.latent]
    if into is None or out is None:
        return (lambda a: a), (lambda a: a)
    if norm and norm[0] is not None:
        return into, lambda a: out(norm[0](a))
    return into, out


# relative error allowed between the rebuilt output and the block's own forward
SELF_CHECK_RTOL = {mx.float32: 1e-4, mx.float16: 2e-2, mx.bfloat16: 5e-2}


def _float32_stack(switch) -> list:
    """Upcast half-precision expert stacks in place (CPU gather_mm is float32-only); returns undo list."""
    undo = []
    for name in projections(switch):
        lin = getattr(switch, name, None)
        if lin is None or "scales" in lin:
            continue
        for key in ("weight", "bias"):
            if key in lin and lin[key].dtype in (mx.float16, mx.bfloat16):
                undo.append((lin, key, lin[key]))
                lin[key] = lin[key].astype(mx.float32)
    return undo


# rows of the first chunk that the self-check compares (mlx_lm's own path is a per-token loop)
SELF_CHECK_ROWS = 256


def self_check(block, fam: Family, cap: Capture, layer: int, where: str,
               reference: Callable | None = None) -> float:
    """Raise BadInput unless Σ w·f(x) (+ shared) reproduces the block's own output on cap.x
    (`reference(x, rows)`: the module whose output it is, where that is not the block)."""
    rows = min(SELF_CHECK_ROWS, cap.x.shape[0])
    undo = _float32_stack(attr(block, fam.stacked)) if mx.default_device() == mx.cpu else []
    try:
        ref = (reference(cap.x[None, :rows], rows) if reference else block(cap.x[None, :rows]))[0].astype(mx.float32)
        mine = cap.output[:rows].astype(mx.float32)
        err = float(mx.sqrt(mx.sum((ref - mine) ** 2)) / (mx.sqrt(mx.sum(ref ** 2)) + 1e-30))
    finally:
        for lin, key, old in undo:
            lin[key] = old
    tol = SELF_CHECK_RTOL.get(cap.x.dtype, 1e-4)
    if not np.isfinite(err) or err > tol:
        raise BadInput(where, f"layer {layer}: routing capture does not reproduce the MoE block "
                              f"(relative error {err:.3g} > {tol:g}); this family's routing is not supported as written")
    return err
