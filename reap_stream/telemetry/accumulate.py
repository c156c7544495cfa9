"""REAP's per-expert sums of one MoE layer, accumulated in float64 chunk by chunk.

For every token t and each expert j in its top-k (A_j = the tokens routed to j): the router weight
g (the full router probability, divided by the token's top-k sum when --renorm-topk), the un-gated
expert output f_j(x) and its L2 norm n. The sums (telemetry/store.LayerStats) are what every
criterion is computed from (docs/plan.md).
"""
from __future__ import annotations

import numpy as np

from .store import LayerStats


class Accumulator:
    """Running float64 sums of one MoE layer over the chunks it has seen."""

    def __init__(self, layer: int, num_experts: int, hidden: int, renorm_topk: bool):
        self.stats = LayerStats.zeros(layer, num_experts, hidden)
        self.renorm_topk = renorm_topk

    def add(self, cap) -> None:
        st = self.stats
        e_count = st.num_experts
        inds = cap.inds                                         # [T, k]
        t, k = inds.shape
        # the k selected probabilities, upcast after the pick (float32 -> float64 is exact)
        g = np.take_along_axis(np.array(cap.routed.probs).reshape(t, -1), inds, axis=1).astype(np.float64)
        if self.renorm_topk:
            g = g / g.sum(axis=1, keepdims=True)
        b = cap.batch
        y32 = b.outputs                                         # [T*k, H] float32, grouped by expert
        norms = np.empty(len(y32))
        st.tokens += t
        for e in np.flatnonzero(np.diff(b.bounds)):
            lo, hi = b.bounds[e], b.bounds[e + 1]
            y = y32[lo:hi].astype(np.float64)   # one expert at a time: no float64 copy of the chunk
            norms[lo:hi] = np.sqrt(np.einsum("ij,ij->i", y, y))
            st.expert_output_sum[e] += y.sum(axis=0)
            st.max_activations[e] = max(st.max_activations[e], y.max())
        g_sorted = g.reshape(-1)[b.order]
        st.frequency += np.bincount(b.experts, minlength=e_count)
        st.weighted_frequency_sum += np.bincount(b.experts, weights=g_sorted, minlength=e_count)
        st.ean_sum += np.bincount(b.experts, weights=norms, minlength=e_count)
        st.weighted_ean_sum += np.bincount(b.experts, weights=g_sorted * norms, minlength=e_count)
        # identity experts (LongCat, ids past the stack) are selected but have no telemetry: one
        # extra row and column gathers them, dropped
        inds, n = np.minimum(inds, e_count), e_count + 1
        pairs = (inds[:, :, None] * n + inds[:, None, :]).reshape(-1)
        st.coactivation += np.bincount(pairs, minlength=n * n).reshape(n, n)[:e_count, :e_count]
