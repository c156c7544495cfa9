"""The MoE capture: a block's routed experts evaluated grouped by expert, a chunk of experts at a
time, and its output rebuilt from them.

`capture` routes exactly (families/routing.py), then runs the routed experts grouped by expert and
rebuilds the block's output from them, so the same pass yields the block output for the next layer
and the per-expert outputs the telemetry needs. Experts come from an `ExpertSource`
(families/expert_source.py) in chunks [lo, hi), so where a layer's experts are read by byte range
they are never whole in memory. Two kernels run them, behind the same call:

- "loop" (the CPU's): one float32 BLAS matmul chain per expert (half-precision weights upcast and
  quantised weights dequantised one expert at a time), shared out to two lanes; Σ w·f(x) in numpy
  in a fixed order, so the bits never depend on the chunking of experts or on the lanes.
- "gather" (Metal's): mlx_lm's own gather / quantised gather matmuls over the chunk's rows sorted by
  expert, in the model's dtype, and the weighted sum in MLX; one transfer of the outputs per chunk
  of tokens for the telemetry, no per-expert round trip to the host. Stacks of expert modules
  (DBRX) and identity experts (LongCat) run the loop.

The self-check (families/self_check.py) compares the result with the block's own code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np

from ..blas import blas_threads, lane_threads
from ..errors import BadInput
from ..procstats import MMAP_THRESHOLD
from .dequant import dequantize_float32
from .expert_source import ExpertSlab, ExpertSource, ModuleExperts, expert_ranges, experts_per_chunk, slabs
from .routing import ROUTERS, Routed, combine
from .stacks import expert_forward, loop_activation, out_dims, projections
from .stacks import parameters as stack_parameters
from .table import Family, attr


def resolve_kernel(kernel: str) -> str:
    """"auto": the gather kernel on an accelerator, the loop on the CPU."""
    if kernel == "auto":
        return "loop" if mx.default_device() == mx.cpu else "gather"
    return kernel


# A half-precision or quantised weight whose float32 form would be at least MMAP_THRESHOLD bytes
# (hidden x width >= 4 M: DeepSeek-V3, Kimi-K2, Qwen3-235B) is converted in pieces of at most
# PIECE_BYTES, each used before the next: whole, it would be a fresh mapping for every expert,
# whose page faults cost most of the arithmetic's time (docs/memory.md); pieces reuse heap memory.
PIECE_BYTES = 4 << 20


def weight_pieces(rows: int, in_dims: int) -> list[tuple[int, int]]:
    """[lo, hi) spans of a weight's output rows converted to float32 one at a time."""
    if rows * in_dims * 4 < MMAP_THRESHOLD:
        return [(0, rows)]
    step = max(1, PIECE_BYTES // (4 * in_dims))
    return [(lo, min(lo + step, rows)) for lo in range(0, rows, step)]


def _expert_linear(lin, arrays: dict, j: int, x: mx.array) -> mx.array:
    """x @ W_j^T (+ b_j) in float32 for expert j of a slab's projection (`lin`: the stack's
    (Quantized)SwitchLinear, for its quantisation settings) through the BLAS, the weight
    upcast or dequantised to float32 (in pieces when large: weight_pieces)."""
    stack = arrays["weight"]   # indexed [j, lo:hi] in one go: stack[j] alone copies the expert's matrix
    rows = stack.shape[1]
    if "scales" in arrays:
        if getattr(lin, "global_scale", None) is not None:
            raise BadInput("model", "experts quantised with a global scale (nvfp4 per-expert) are not supported")
        scales, biases = arrays["scales"], arrays.get("biases")

        def float32(lo: int, hi: int) -> mx.array:
            return dequantize_float32(stack[j, lo:hi], scales[j, lo:hi], None if biases is None else biases[j, lo:hi],
                                      group_size=lin.group_size, bits=lin.bits, mode=lin.mode)
    else:
        def float32(lo: int, hi: int) -> mx.array:
            return stack[j, lo:hi].astype(mx.float32)
    xf = x.astype(mx.float32)
    spans = weight_pieces(rows, x.shape[-1]) if stack.dtype != mx.float32 else [(0, rows)]
    if len(spans) == 1:
        y = xf @ float32(0, rows).T
    else:
        parts = []
        for lo, hi in spans:
            parts.append(xf @ float32(lo, hi).T)
            mx.eval(parts[-1])   # this piece's float32 weight is freed before the next is made
        y = mx.concatenate(parts, axis=-1)
    if "bias" in arrays:
        y = y + arrays["bias"][j].astype(y.dtype)
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
# Called with each slab once its experts are computed: (slab, first sorted row, its rows' outputs)
OnSlab = Callable[[ExpertSlab, int, object], None]


def _two_shares(active: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive experts split where half the routed rows lie on each side."""
    cum = np.cumsum(rows)
    cut = int(np.searchsorted(cum, cum[-1] / 2)) + 1 if len(cum) else 0
    return active[:cut], active[cut:]


@dataclass(frozen=True)
class ExpertPlan:
    """How a layer's experts are run: where from, how many at a time, by which kernel."""

    source: ExpertSource | None = None   # None: the stack module's own arrays
    chunk_bytes: int | None = None       # bytes of experts per chunk (None: all at once; at least one)
    kernel: str = "auto"


def run_experts(switch, x: mx.array, inds: np.ndarray, num_experts: int, weights: np.ndarray,
                pair: Pair | None = None, input_scale: np.ndarray | None = None, plan: ExpertPlan = ExpertPlan(),
                on_slab: OnSlab | None = None) -> tuple[ExpertBatch, mx.array]:
    """Every routed expert output f_e(x_t) and the weighted sum Σ_k w·f(x) per token (`weights`
    [T, k]), experts read and run a chunk at a time (`plan`). With `input_scale` ([T, k]) expert e
    sees x_t * scale (Llama-4).

    Loop kernel: experts one after another, so the working set is one expert's rows plus the
    outputs. With `pair`, on the CPU and where the lanes call the BLAS single-threaded
    (blas.lane_threads), each chunk's experts are shared out to two lanes (MLX's CPU element-wise
    kernels use one core per stream). The BLAS thread count of the expert matmuls depends on that
    configuration alone, not on whether a pair was given, so every mode computes every expert with
    the same calls and gets the same bits, whatever the chunking of experts.
    """
    names = projections(switch)  # a known stack form, or one line saying it is not
    k = inds.shape[1]
    flat = inds.reshape(-1)
    order = np.argsort(flat, kind="stable")
    experts = flat[order]
    bounds = np.searchsorted(experts, np.arange(num_experts + 1))
    whole = bounds[-1] == len(order)
    order, experts = order[:bounds[-1]], experts[:bounds[-1]]  # ids past the stack: identity experts
    tokens = (order // k).astype(np.int32)
    scale = None if input_scale is None else input_scale.reshape(-1)[order].astype(np.float32)
    source = plan.source if plan.source is not None else ModuleExperts(switch, names)
    active = np.flatnonzero(np.diff(bounds))
    ranges = expert_ranges(num_experts, experts_per_chunk(source, plan.chunk_bytes), active)
    w_sorted = weights.reshape(-1)[order].astype(np.float32)
    if resolve_kernel(plan.kernel) == "gather" and names and whole:
        outputs, y = _gather(switch, x, source, ranges, experts, bounds, tokens, order, w_sorted, scale,
                             inds.shape, on_slab)
    else:
        outputs = _loop(switch, x, source, ranges, bounds, tokens, scale, pair, on_slab)
        y = mx.array(_weighted_sum(outputs, w_sorted, tokens, bounds, inds.shape[0]))
    return ExpertBatch(order, experts, bounds, outputs), y


def _rows(x: mx.array, tokens: np.ndarray, scale: np.ndarray | None, lo: int, hi: int) -> mx.array:
    """The inputs of sorted rows [lo, hi): their tokens' x (times the input scale, Llama-4)."""
    xe = x[mx.array(tokens[lo:hi])]
    return xe if scale is None else xe * mx.array(scale[lo:hi, None]).astype(x.dtype)


def _loop(switch, x: mx.array, source: ExpertSource, ranges: list, bounds: np.ndarray, tokens: np.ndarray,
          scale: np.ndarray | None, pair: Pair | None, on_slab: OnSlab | None) -> np.ndarray:
    outputs = np.empty((int(bounds[-1]), out_dims(switch)), np.float32)
    counts = np.diff(bounds)
    names = {id(getattr(switch, p)): p for p in projections(switch)}
    activation = loop_activation(switch)

    def share(slab: ExpertSlab, ids: np.ndarray) -> Callable[[], None]:
        def linear(lin, e: int, v: mx.array) -> mx.array:
            return _expert_linear(lin, slab.arrays[names[id(lin)]], e - slab.lo, v)

        def run() -> None:
            for e in map(int, ids):
                lo, hi = int(bounds[e]), int(bounds[e + 1])
                out = expert_forward(switch, e, _rows(x, tokens, scale, lo, hi), linear, activation).astype(mx.float32)
                outputs[lo:hi] = np.array(out)
        return run

    threads = lane_threads() if mx.default_device() == mx.cpu else None
    with blas_threads(threads):
        for slab in slabs(source, ranges):
            ids = np.arange(slab.lo, slab.hi)
            ids = ids[counts[ids] > 0]
            first, second = _two_shares(ids, counts[ids])
            if pair is not None and threads == 1:
                # the other lane cannot run work queued on this thread's stream
                mx.eval(x, slab.arrays_list() if names else stack_parameters(switch))
                pair(share(slab, first), share(slab, second))
            else:
                share(slab, first)()
                share(slab, second)()
            if on_slab is not None:
                a, b = int(bounds[slab.lo]), int(bounds[slab.hi])
                on_slab(slab, a, outputs[a:b])
    return outputs


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


class installed:
    """Context: the stack's projections hold `arrays` (projection -> parameter -> array) instead
    of their own, so mlx_lm's own expert code runs on a slab; restored on exit."""

    def __init__(self, switch, arrays: dict[str, dict[str, mx.array]]):
        self.switch, self.arrays, self.saved = switch, arrays, []

    def __enter__(self):
        for proj, params in self.arrays.items():
            lin = getattr(self.switch, proj)
            for name, a in params.items():
                self.saved.append((lin, name, lin[name]))
                lin[name] = a
        return self.switch

    def __exit__(self, *exc) -> None:
        for lin, name, old in reversed(self.saved):
            lin[name] = old


def _gather(switch, x: mx.array, source: ExpertSource, ranges: list, experts: np.ndarray, bounds: np.ndarray,
            tokens: np.ndarray, order: np.ndarray, w_sorted: np.ndarray, scale: np.ndarray | None, shape: tuple,
            on_slab: OnSlab | None) -> tuple[np.ndarray, mx.array]:
    parts = []
    width = out_dims(switch)
    for slab in slabs(source, ranges):
        a, b = int(bounds[slab.lo]), int(bounds[slab.hi])
        idx = mx.array((experts[a:b] - slab.lo).astype(np.uint32))
        with installed(switch, slab.arrays):
            def linear(lin, e, v):
                return lin(v, idx, sorted_indices=True)
            out = expert_forward(switch, None, _rows(x, tokens, scale, a, b)[:, None, :], linear)
            out = out[:, 0].astype(mx.float32)
            mx.eval(out)
        if on_slab is not None:
            on_slab(slab, a, out)
        parts.append(out)
    t, k = shape
    unsort = mx.array(np.argsort(order, kind="stable"))
    if parts:
        sorted_out = mx.concatenate(parts, axis=0)
        unsorted = sorted_out[unsort].reshape(t, k, -1)
    else:
        sorted_out = mx.zeros((0, width), mx.float32)
        unsorted = mx.zeros((t, k, width), mx.float32)
    w = mx.array(w_sorted[np.argsort(order, kind="stable")].reshape(t, k))
    y = (unsorted * w[..., None]).sum(axis=1)
    mx.eval(y, sorted_out)
    return np.array(sorted_out), y


@dataclass
class Capture:
    """One chunk seen by one MoE block."""

    x: mx.array            # [T, D] block input
    routed: Routed
    inds: np.ndarray       # [T, k] int64
    batch: ExpertBatch
    output: mx.array       # [T, D] block output rebuilt from the experts (+ shared), x's dtype
    expert_check: object = None   # self_check.ExpertCheck when this chunk is checked by replay


def capture(block, fam: Family, x: mx.array, top_k: int, num_experts: int, pair: Pair | None = None,
            routed: Routed | None = None, plan: ExpertPlan = ExpertPlan(), check: bool = False) -> Capture:
    """Route x [T, D] exactly as `block` does (or take `routed`, the model's own router's choice)
    and evaluate its experts grouped by expert, a chunk of experts at a time (`plan`; shared out to
    two lanes with `pair`: the same bits either way). With `check` and experts read by range
    (plan.source), the first rows' expert outputs are recomputed by mlx_lm's own expert stack on
    each chunk while it is in memory (self_check.ExpertCheck)."""
    from .self_check import ExpertCheck

    routed = routed or ROUTERS[fam.routing](block, fam, x, top_k)
    mx.eval(x, routed.inds, routed.weights, routed.probs)
    inds = np.array(routed.inds).astype(np.int64)
    weights = np.array(routed.weights.astype(mx.float32))
    scale = None if routed.input_scale is None else np.array(routed.input_scale.astype(mx.float32))
    switch = attr(block, fam.stacked)
    into, out_of = _latent(block, fam)
    xe = into(x)
    checker = ExpertCheck(switch, xe, inds) if check and plan.source is not None else None
    batch, y = run_experts(switch, xe, inds, num_experts, weights, pair, scale, plan, checker)
    y = out_of(y.astype(x.dtype))
    if fam.identity_experts is not None:  # LongCat: ids past the routed experts add w * x
        identity = mx.array(np.where(inds >= num_experts, weights, 0.0).sum(axis=1, keepdims=True))
        y = y + x * identity.astype(x.dtype)
    y = combine(block, fam, x, y)
    mx.eval(y)
    return Capture(x, routed, inds, batch, y, checker)


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
