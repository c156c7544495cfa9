"""`reap-stream plan` (telemetry -> plan.json) and `reap-stream init` (synthetic telemetry for demos)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import click
import numpy as np
from tqdm import tqdm

from .. import __version__
from ..planning.criteria import METHODS
from ..errors import BadInput
from ..planning.planner import BUDGETS, make_plan, parse_layer_spec, structure_from_model
from ..telemetry.store import LayerStats, TelemetryStore


@click.command("plan")
@click.argument("telemetry", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Plan JSON to write.")
@click.option("--method", required=True, type=click.Choice(METHODS), help="Saliency criterion.")
@click.option("--ratio", type=float, help="Fraction of routed experts to prune per layer, in [0, 1).")
@click.option("--n-prune", type=int, help="Experts to prune per layer.")
@click.option("--keep", type=int, help="Experts to keep per layer.")
@click.option("--min-experts", default=1, show_default=True, help="Never keep fewer (top_k is always a floor).")
@click.option("--skip-layers", default="", help="MoE layers to leave whole, e.g. 0,1,40-47.")
@click.option("--preserve-super-experts/--no-preserve-super-experts", default=True, show_default=True,
              help="Never prune experts with outlier max activations (first 75% of layers).")
@click.option("--budget", type=click.Choice(BUDGETS), default="uniform", show_default=True,
              help="uniform: same count per layer; global: one budget over per-layer-normalised scores.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random baseline.")
@click.option("--model", "model_dir", type=click.Path(path_type=Path),
              help="Source model: checks the telemetry belongs to it and reads hash/MTP layers from its config.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def plan_cmd(telemetry: Path, out: Path, method: str, ratio: float | None, n_prune: int | None, keep: int | None,
             min_experts: int, skip_layers: str, preserve_super_experts: bool, budget: str, seed: int,
             model_dir: Path | None, as_json: bool) -> None:
    """Choose the experts to prune from TELEMETRY and write a plan."""
    store = TelemetryStore.open(telemetry)
    if out.is_dir() or not out.parent.is_dir():
        raise BadInput(out, "is a directory" if out.is_dir() else f"directory {out.parent} does not exist")
    config = _check_model(store, model_dir) if model_dir else None
    plan = make_plan(store, method=method, ratio=ratio, n_prune=n_prune, keep=keep, min_experts=min_experts,
                     skip_layers=parse_layer_spec(skip_layers), preserve_super_experts=preserve_super_experts,
                     budget=budget, seed=seed, config=config, progress=not as_json)
    plan.save(out)
    summary = {
        "out": str(out), "telemetry": str(telemetry), "method": plan.method, "ratio": plan.ratio, "uniform": plan.uniform,
        "kept_per_layer": {str(k): len(lp.kept) for k, lp in sorted(plan.layers.items())},
        "pruned_per_layer": {str(k): lp.pruned for k, lp in sorted(plan.layers.items())},
        "super_experts": {str(k): lp.extra["super_experts"] for k, lp in sorted(plan.layers.items())
                          if lp.extra.get("super_experts")},
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    counts = sorted(set(summary["kept_per_layer"].values()))
    kept = str(counts[0]) if len(counts) == 1 else f"{counts[0]}..{counts[-1]} (non-uniform)"
    gone = sum(len(v) for v in summary["pruned_per_layer"].values())
    click.echo(f"wrote {out}: {plan.method}, {gone} experts pruned over {len(plan.layers)} layers, kept per layer: {kept}")
    guarded = summary["super_experts"]
    if guarded:
        shown = "; ".join(f"layer {k}: {v}" for k, v in list(guarded.items())[:5])
        click.echo(f"  super experts protected in {len(guarded)} layer(s): {shown}" + (" …" if len(guarded) > 5 else ""))


def _check_model(store: TelemetryStore, model_dir: Path) -> dict:
    """Refuse telemetry collected on another model than MODEL_DIR; return its config."""
    from ..io.safetensors import Checkpoint
    from ..families.structure import checkpoint_structure, fingerprint

    ckpt = Checkpoint.open(model_dir)
    recorded = store.attrs.get("model") or {}
    st = checkpoint_structure(ckpt)
    fp = fingerprint(ckpt, st)
    if recorded.get("fingerprint") != fp:
        raise BadInput(store.path, f"telemetry was collected on another model (fingerprint "
                                   f"{str(recorded.get('fingerprint'))[:19]}…, {model_dir} is {fp[:19]}…)")
    shape = st.to_json()
    for key in ("model_type", "moe_layers", "num_experts", "top_k"):
        if recorded.get(key) != shape[key]:
            raise BadInput(store.path, f"telemetry {key} {recorded.get(key)!r} differs from {model_dir}'s {shape[key]!r}")
    return ckpt.config


# ---- init: synthetic telemetry -------------------------------------------------------------------

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


def model_block_like(model_dir: Path) -> tuple[dict, int]:
    """The `model` block collect would write for MODEL_DIR, and its hidden size."""
    from ..io.safetensors import Checkpoint
    from ..families.structure import checkpoint_structure, fingerprint

    ckpt = Checkpoint.open(model_dir)
    st = checkpoint_structure(ckpt)
    return {**st.to_json(), "fingerprint": fingerprint(ckpt, st)}, int(ckpt.config.get("hidden_size", 32))


def write_synthetic_telemetry(out: Path, *, layers: int = 8, experts: int = 16, seed: int = 0, top_k: int = 2,
                              tokens: int = 2048, hidden: int = 32, n_group: int = 1, topk_group: int = 1,
                              model: dict | None = None, progress: bool = False) -> TelemetryStore:
    """A complete synthetic telemetry store with the attributes collect writes; written under a
    temporary name and renamed, so `out` is either absent or whole. With `model` (a model block,
    e.g. from `model_block_like`) the store is shaped like that real model and plans made from it
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
    shape = structure_from_model(model, where)
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
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return TelemetryStore.open(out)


@click.command("init")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Telemetry store to create.")
@click.option("--layers", default=8, show_default=True, help="MoE layers.")
@click.option("--experts", default=16, show_default=True, help="Routed experts per layer.")
@click.option("--top-k", default=2, show_default=True, help="Experts per token.")
@click.option("--tokens", default=2048, show_default=True, help="Synthetic calibration tokens.")
@click.option("--hidden", default=32, show_default=True, help="Hidden size of expert outputs.")
@click.option("--n-group", default=1, show_default=True, help="Expert groups (DeepSeek-style group routing).")
@click.option("--topk-group", default=1, show_default=True, help="Groups each token may use.")
@click.option("--seed", default=0, show_default=True)
@click.option("--like", "like", type=click.Path(path_type=Path),
              help="Shape the store like this model directory (its MoE layers, experts, top_k, fingerprint).")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
def init_cmd(out: Path, layers: int, experts: int, top_k: int, tokens: int, hidden: int, n_group: int,
             topk_group: int, seed: int, like: Path | None, overwrite: bool) -> None:
    """Write synthetic telemetry (varied experts, never-routed ones, a super expert) for demos and tests."""
    if out.exists() and not overwrite:
        raise BadInput(out, "exists; pass --overwrite to replace it")
    if out.exists():
        TelemetryStore.open(out)  # only ever replace a telemetry store
    model = None
    if like is not None:
        model, hidden = model_block_like(like)
    store = write_synthetic_telemetry(out, layers=layers, experts=experts, seed=seed, top_k=top_k, tokens=tokens,
                                      hidden=hidden, n_group=n_group, topk_group=topk_group, model=model,
                                      progress=True)
    m = store.attrs["model"]
    click.echo(f"wrote {out}: {len(m['moe_layers'])} MoE layers x {m['num_experts']} experts, top_k={m['top_k']}, "
               f"{tokens} tokens, telemetry {store.fingerprint()[:19]}…")
