"""Synthetic telemetry (`reap-stream init`): what collect would record for a model that routes like a
softmax-top-k MoE with log-normal popularity, never-routed experts and one super expert; for demos,
tests and planning experiments without running a model."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .. import __version__
from ..errors import BadInput
from ..io.files import replace_dir
from ..families.structure import MoEStructure
from .store import LayerStats, TelemetryStore


def synthetic_layer(layer: int, rng: np.random.Generator, *, experts: int, top_k: int, tokens: int,
                    hidden: int, dead: int, spike: bool) -> LayerStats:
    """Route `tokens` random tokens like a softmax-top-k MoE and accumulate what collect would.

    Popularity is log-normal (a few busy experts, a long tail), `dead` experts are never routed,
    and with `spike` one routed expert is a super expert: one huge activation on one token.
    """
    popularity = rng.normal(0.0, 1.0, experts)
    dead_ids = rng.choice(experts, size=dead, replace=False) if dead else np.zeros(0, int)
    logits = popularity + rng.normal(0.0, 1.5, (tokens, experts))
    logits[:, dead_ids] = -np.inf
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    chosen = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    gates = np.take_along_axis(probs, chosen, axis=1)
    gates /= gates.sum(axis=1, keepdims=True)           # renormalised top-k

    scale = rng.lognormal(0.0, 0.5, experts)
    direction = rng.normal(0.0, 0.5, (experts, hidden))
    ids = chosen.reshape(-1)
    out = scale[ids, None] * (direction[ids] + rng.normal(0.0, 1.0, (ids.size, hidden)))
    if spike:
        rows = np.flatnonzero(ids == rng.choice(np.unique(ids)))
        out[rows[0], 0] = 50.0 * np.abs(out).max()
    g, norms = gates.reshape(-1), np.linalg.norm(out, axis=1)

    st = LayerStats.zeros(layer, experts, hidden)
    st.tokens = tokens
    np.add.at(st.frequency, ids, 1.0)
    np.add.at(st.weighted_frequency_sum, ids, g)
    np.add.at(st.ean_sum, ids, norms)
    np.add.at(st.weighted_ean_sum, ids, g * norms)
    np.add.at(st.expert_output_sum, ids, out)
    np.maximum.at(st.max_activations, ids, out.max(axis=1))
    onehot = np.zeros((tokens, experts))
    np.put_along_axis(onehot, chosen, 1.0, axis=1)
    st.coactivation = onehot.T @ onehot
    return st


def synthetic_model(*, layers: int, experts: int, top_k: int, n_group: int, topk_group: int, tag: str) -> dict:
    """The `model` block of a store for a model that does not exist (fingerprint names the draw)."""
    return {"model_type": "synthetic", "num_layers": layers, "moe_layers": list(range(layers)),
            "num_experts": experts, "top_k": top_k, "n_group": n_group, "topk_group": topk_group,
            "fingerprint": f"sha256:synthetic-{tag}"}


def write_synthetic_telemetry(out: Path, *, layers: int = 8, experts: int = 16, seed: int = 0, top_k: int = 2,
                              tokens: int = 2048, hidden: int = 32, n_group: int = 1, topk_group: int = 1,
                              model: dict | None = None, progress: bool = False) -> TelemetryStore:
    """A complete synthetic telemetry store with the attributes collect writes; written under a
    temporary name and renamed, so `out` is either absent or whole. With `model` (a model block,
    e.g. Model.model_block()) the store is shaped like that real model and plans made from it
    apply to it."""
    where = str(out)
    if model is None:
        if layers < 1 or experts < 2 or not (1 <= top_k < experts) or tokens < 1 or hidden < 1:
            raise BadInput(where, "need --layers >= 1, --experts >= 2, 1 <= --top-k < --experts, --tokens >= 1, --hidden >= 1")
        if n_group < 1 or experts % n_group or not (1 <= topk_group <= n_group):
            raise BadInput(where, f"--n-group {n_group} must divide --experts {experts}, with 1 <= --topk-group <= n_group")
        tag = f"{seed}-{layers}x{experts}-k{top_k}-t{tokens}-h{hidden}-g{n_group}.{topk_group}"
        model = synthetic_model(layers=layers, experts=experts, top_k=top_k, n_group=n_group,
                                topk_group=topk_group, tag=tag)
    shape = MoEStructure.from_json(model, where)
    per_layer, top_k = shape.layer_experts, shape.top_k
    attrs = {
        "model": model,
        "calibration": {"fingerprint": "sha256:" + hashlib.sha256(f"synthetic-calibration-{seed}-{tokens}".encode()).hexdigest(),
                        "num_tokens": tokens, "source": f"synthetic (seed {seed})"},
        "routing": {"renorm_topk": True, "mode": "softmax_topk", "synthetic": True},
        "tool_version": __version__,
    }
    tmp = out.parent / f".{out.name}.reap-tmp"
    if tmp.exists():
        shutil.rmtree(tmp)  # leftover of a killed run: ours by name
    store = TelemetryStore.create(tmp, attrs)
    rng = np.random.default_rng(seed)
    first = min(per_layer)
    for layer in tqdm(sorted(per_layer), desc="init", unit="layer", leave=False, disable=None if progress else True):
        e = per_layer[layer]
        # never-routed experts from the second MoE layer on, as many as top-k routing can spare
        dead = min(max(1, e // 8), e - top_k - 1) if layer > first and e > top_k + 1 else 0
        # one super expert, in the second MoE layer (inside the guarded first 75%)
        spike = layer == sorted(per_layer)[min(1, len(per_layer) - 1)]
        store.commit(synthetic_layer(layer, rng, experts=e, top_k=top_k, tokens=tokens, hidden=hidden,
                                     dead=dead, spike=spike))
    replace_dir(tmp, out)
    return TelemetryStore.open(out)
