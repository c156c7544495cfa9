"""The self-check: the capture's result against the MoE block's own mlx_lm code, on the first chunk
of every layer (routing captured by hand is easy to get wrong; docs/routing.md).

Where the layer's experts are whole in memory (memory mode, and the stack forms and layouts that are
not read by byte range: families/expert_source.py) the block's own forward runs on the first
SELF_CHECK_ROWS rows, its expert stack upcast to float32 on the CPU (`whole_block_check`).

Where the experts are read a chunk at a time it is two comparisons, so that it never needs a
layer's experts whole (nor upcast) and costs a small fixed amount whatever the quantisation:

- routing and combination: the block's own forward on the first SELF_CHECK_ROWS rows, with its
  expert stack replaced by a replay of the capture's expert outputs for whatever (token, expert)
  pairs the block asks for. The block's own router, selection, weights, sum and shared experts
  then run; a pair the capture did not route, an expert input other than the block's input, or an
  output that differs, stops the run.
- the experts themselves: the outputs of the first SELF_CHECK_EXPERT_TOKENS tokens, recomputed by
  mlx_lm's own expert stack (its gather / quantised gather matmuls) on each chunk of experts while
  that chunk is in memory (`ExpertCheck`, fed by run_experts). On the CPU it runs in float32 (the
  CPU's half-precision and quantised kernels round in the model's dtype).
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from typing import Callable

from ..errors import BadInput
from .expert_source import ExpertSlab
from .stacks import projections
from .table import Family, attr

# relative error allowed between the rebuilt output and the block's own forward
SELF_CHECK_RTOL = {mx.float32: 1e-4, mx.float16: 2e-2, mx.bfloat16: 5e-2}
# ... and between our dequantised float32 experts and MLX's quantised gather matmul
QUANTISED_RTOL = 2e-2
# rows of the first chunk whose routing and combination are checked
SELF_CHECK_ROWS = 256
# tokens of the first chunk whose expert outputs mlx_lm's own expert stack recomputes: the cost is
# that of upcasting the top-k experts of each of these tokens (2 x 8 of Qwen3-30B's 128 experts)
SELF_CHECK_EXPERT_TOKENS = 2


def _relative(ref: np.ndarray, mine: np.ndarray) -> float:
    return float(np.sqrt(np.sum((ref - mine) ** 2)) / (np.sqrt(np.sum(ref ** 2)) + 1e-30))


class ExpertCheck:
    """Expert outputs of the first SELF_CHECK_EXPERT_TOKENS tokens vs mlx_lm's own expert stack,
    slab by slab (called by run_experts with each slab, its first sorted row and its outputs)."""

    def __init__(self, switch, x: mx.array, inds: np.ndarray):
        k = inds.shape[1]
        flat = inds.reshape(-1)
        order = np.argsort(flat, kind="stable")   # run_experts' order
        self.switch, self.x = switch, x
        self.tokens, self.experts = order // k, flat[order]
        self.checked = np.flatnonzero(self.tokens < min(SELF_CHECK_EXPERT_TOKENS, x.shape[0]))
        self.sq_err = self.sq_ref = 0.0
        self.quantised = False

    def __call__(self, slab: ExpertSlab, first: int, out) -> None:
        from .experts import installed

        sel = self.checked[(self.checked >= first) & (self.checked < first + out.shape[0])]
        if not len(sel):
            return
        cpu = mx.default_device() == mx.cpu
        ids = np.unique(self.experts[sel])              # only the experts these rows use
        take = mx.array((ids - slab.lo).astype(np.uint32))
        arrays = {p: {n: _reference_dtype(a[take], cpu) for n, a in params.items()} for p, params in slab.arrays.items()}
        self.quantised |= any("scales" in p for p in arrays.values())
        xs = self.x[mx.array(self.tokens[sel].astype(np.int32))]
        local = mx.array(np.searchsorted(ids, self.experts[sel]).astype(np.uint32))[:, None]
        with installed(self.switch, arrays):
            ref = self.switch(xs.astype(mx.float32) if cpu else xs, local)[:, 0]   # mlx_lm's own code
            ref = np.array(ref.astype(mx.float32))
        rows = sel - first
        mine = np.array(out[mx.array(rows)]) if isinstance(out, mx.array) else np.asarray(out[rows])
        self.sq_err += float(np.sum((ref - mine.astype(np.float32)) ** 2))
        self.sq_ref += float(np.sum(ref ** 2))

    def error(self) -> float:
        return float(np.sqrt(self.sq_err) / (np.sqrt(self.sq_ref) + 1e-30))


def _reference_dtype(a: mx.array, cpu: bool) -> mx.array:
    return a.astype(mx.float32) if cpu and a.dtype in (mx.float16, mx.bfloat16) else a


class _Replay:
    """Stands in for the expert stack inside the block's own forward: the capture's output of
    every (token, expert) pair the block asks for."""

    def __init__(self, cap, rows: int):
        self.cap, self.rows = cap, rows
        self.missing: tuple[int, int] | None = None
        self.same_input = True

    def __call__(self, x, indices, *args, **kwargs):
        cap, rows = self.cap, self.rows
        b = cap.batch
        width = cap.x.shape[-1]
        self.same_input = bool(mx.array_equal(x.reshape(-1, width), cap.x[:rows]).item())
        asked = np.array(indices).reshape(rows, -1)
        tokens = b.order // cap.inds.shape[1]
        pos = np.full(asked.shape, -1)
        for e in np.unique(asked):
            lo, hi = int(b.bounds[e]), int(b.bounds[e + 1])
            t, j = np.nonzero(asked == e)
            p = lo + np.searchsorted(tokens[lo:hi], t)
            found = (p < hi) & (tokens[np.minimum(p, len(tokens) - 1)] == t)
            pos[t[found], j[found]] = p[found]
        if (pos < 0).any():
            t, j = np.argwhere(pos < 0)[0]
            self.missing = (int(t), int(asked[t, j]))
        out = b.outputs[np.maximum(pos, 0)]
        out[pos < 0] = 0.0
        return mx.array(out.reshape(*indices.shape, width))


def self_check(block, fam: Family, cap, layer: int, where: str, reference: Callable | None = None) -> float:
    """Raise BadInput unless the capture reproduces the block's own code (module docstring);
    returns the relative error of the block output. `reference(x, rows)`: the module whose output
    it is, where that is not the block."""
    if cap.expert_check is None:
        return whole_block_check(block, fam, cap, layer, where, reference)
    rows = min(SELF_CHECK_ROWS, cap.x.shape[0])
    replay = _Replay(cap, rows)
    stack = block[fam.stacked]
    block[fam.stacked] = replay
    try:
        ref = np.array(block(cap.x[None, :rows])[0].astype(mx.float32))
    finally:
        block[fam.stacked] = stack
    fault = f"layer {layer}: routing capture does not reproduce the MoE block"
    unsupported = "this family's routing is not supported as written"
    if replay.missing is not None:
        t, e = replay.missing
        raise BadInput(where, f"{fault} (the block routes token {t} to expert {e}, the capture does not); {unsupported}")
    if not replay.same_input:
        raise BadInput(where, f"{fault} (its experts see another input than the block's); {unsupported}")
    err = _relative(ref, np.array(cap.output[:rows].astype(mx.float32)))
    tol = SELF_CHECK_RTOL.get(cap.x.dtype, 1e-4)
    if not np.isfinite(err) or err > tol:
        raise BadInput(where, f"{fault} (relative error {err:.3g} > {tol:g}); {unsupported}")
    check = cap.expert_check
    e_err = check.error()
    e_tol = QUANTISED_RTOL if check.quantised else \
        SELF_CHECK_RTOL[mx.float32 if mx.default_device() == mx.cpu else cap.x.dtype]
    if not np.isfinite(e_err) or e_err > e_tol:
        raise BadInput(where, f"layer {layer}: expert outputs differ from mlx_lm's own expert stack "
                              f"(relative error {e_err:.3g} > {e_tol:g}); this family's experts are not "
                              f"supported as written")
    return err


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


def whole_block_check(block, fam: Family, cap, layer: int, where: str, reference: Callable | None = None) -> float:
    """Raise BadInput unless Σ w·f(x) (+ shared) reproduces the block's own output on cap.x, the
    block's experts whole in memory."""
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
