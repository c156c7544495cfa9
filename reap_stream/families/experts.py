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
from .routing import ROUTERS, Routed, shared_output
from .table import Family

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
                weights: np.ndarray, pair: Pair | None = None) -> tuple[ExpertBatch, mx.array]:
    """Every routed expert output f_e(x_t), one dense matmul chain per expert, and the weighted
    sum Σ_k w·f(x) per token (`weights` [T, k]) in float32.

    Experts are evaluated one after another, so the working set is one expert's rows plus the
    outputs, not the k-fold expansion of the whole chunk at once. With `pair`, on the CPU and
    where the lanes call the BLAS single-threaded (blas.lane_threads), the experts are shared out
    to two lanes (MLX's CPU element-wise kernels use one core per stream). The BLAS thread count
    of the expert matmuls depends on that configuration alone, not on whether a pair was given, so
    every mode computes every expert with the same calls and gets the same bits.
    """
    if not all(hasattr(switch, p) for p in ("gate_proj", "up_proj", "down_proj")):
        raise BadInput("model", f"expert module {type(switch).__name__} is not a gated (SwitchGLU) expert stack")
    k = inds.shape[1]
    flat = inds.reshape(-1)
    order = np.argsort(flat, kind="stable")
    experts = flat[order]
    bounds = np.searchsorted(experts, np.arange(num_experts + 1))
    tokens = (order // k).astype(np.int32)
    outputs = np.empty((len(order), x.shape[-1]), np.float32)

    def share(ids: np.ndarray) -> Callable[[], None]:
        def run() -> None:
            for e in map(int, ids):
                lo, hi = int(bounds[e]), int(bounds[e + 1])
                xe = x[mx.array(tokens[lo:hi])]
                up = _expert_linear(switch.up_proj, e, xe)
                gate = _expert_linear(switch.gate_proj, e, xe)
                out = _expert_linear(switch.down_proj, e, switch.activation(up, gate)).astype(mx.float32)
                outputs[lo:hi] = np.array(out)
        return run

    active = np.flatnonzero(np.diff(bounds))
    first, second = _two_shares(active, np.diff(bounds)[active])
    threads = lane_threads() if mx.default_device() == mx.cpu else None
    with blas_threads(threads):
        if pair is not None and threads == 1:
            mx.eval(x, switch.parameters())  # the other lane cannot run work queued on this thread's stream
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


def capture(block, fam: Family, x: mx.array, top_k: int, num_experts: int, pair: Pair | None = None) -> Capture:
    """Route x [T, D] exactly as `block` does and evaluate its experts grouped by expert
    (shared out to two lanes with `pair`; the same bits either way)."""
    routed = ROUTERS[fam.routing](block, fam, x, top_k)
    mx.eval(x, routed.inds, routed.weights, routed.probs)
    inds = np.array(routed.inds).astype(np.int64)
    weights = np.array(routed.weights.astype(mx.float32))
    batch, y = run_experts(getattr(block, fam.stacked), x, inds, num_experts, weights, pair)
    y = y.astype(x.dtype)
    shared = shared_output(block, fam, x)
    if shared is not None:
        y = y + shared
    mx.eval(y)
    return Capture(x, routed, inds, batch, y)


# relative error allowed between the rebuilt output and the block's own forward
SELF_CHECK_RTOL = {mx.float32: 1e-4, mx.float16: 2e-2, mx.bfloat16: 5e-2}


def _float32_stack(switch) -> list:
    """Upcast half-precision expert stacks in place (CPU gather_mm is float32-only); returns undo list."""
    undo = []
    for name in ("gate_proj", "up_proj", "down_proj"):
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


def self_check(block, fam: Family, cap: Capture, layer: int, where: str) -> float:
    """Raise BadInput unless Σ w·f(x) (+ shared) reproduces the block's own output on cap.x."""
    rows = min(SELF_CHECK_ROWS, cap.x.shape[0])
    undo = _float32_stack(getattr(block, fam.stacked)) if mx.default_device() == mx.cpu else []
    try:
        ref = block(cap.x[None, :rows])[0].astype(mx.float32)
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
