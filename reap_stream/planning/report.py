"""A telemetry (and plan) report: markdown plus three PNG figures, byte-identical for the same inputs.

Figures: layer x expert saliency heatmap with the plan's pruned experts overlaid, the spread of
routing frequency across each layer's experts, and the distribution of kept vs pruned scores.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
import numpy as np  # noqa: E402

from .criteria import METHODS, scores  # noqa: E402
from ..errors import BadInput  # noqa: E402
from .plan import Plan  # noqa: E402
from ..io.files import write_text_atomic  # noqa: E402
from ..telemetry.store import Fingerprint, TelemetryStore  # noqa: E402

FIGURES = ("heatmap.png", "frequency_spread.png", "score_distribution.png")
_PNG_META = {"Software": None}  # no matplotlib version stamp: same inputs, same bytes
_MARKER_LIMIT = 4096            # mark pruned cells individually up to this many cells
_ANNOTATE_LAYERS = 24           # label never-routed counts under each box up to this many layers


@dataclass
class LayerView:
    layer: int
    tokens: int
    frequency: np.ndarray
    score: np.ndarray
    pruned: list[int]
    super_experts: list[int]


def load_views(store: TelemetryStore, method: str, plan: Plan | None,
               plan_where: str) -> tuple[list[LayerView], str]:
    """Every layer's view, and the telemetry fingerprint hashed on the way (one read of the store)."""
    views = []
    fp = Fingerprint()  # layers() is ascending, as TelemetryStore.fingerprint hashes them
    layers = store.layers()
    for layer in layers:
        st = store.read(layer)
        fp.add(st)
        lp = plan.layers.get(layer) if plan else None
        if lp is not None and len(lp.kept) + len(lp.pruned) != st.num_experts:
            raise BadInput(plan_where, f"layer {layer}: plan covers {len(lp.kept) + len(lp.pruned)} experts, "
                                       f"the telemetry {st.num_experts}")
        views.append(LayerView(layer, st.tokens, st.frequency, scores(method, st, seed=_seed(plan)),
                               list(lp.pruned) if lp else [], list(lp.extra.get("super_experts", [])) if lp else []))
    if plan:
        extra = sorted(set(plan.layers) - set(layers))
        if extra:
            raise BadInput(plan_where, f"plan prunes layer {extra[0]}, which the telemetry does not hold")
    return views, fp.hexdigest()


def _seed(plan: Plan | None) -> int:
    return int(((plan.extra.get("provenance") or {}).get("options") or {}).get("seed", 0)) if plan else 0


def layer_normalised(score: np.ndarray) -> np.ndarray:
    """Scores as a fraction of the layer's largest finite score; never-routed (-inf) become NaN."""
    s = np.where(np.isfinite(score), score, np.nan)
    top = np.nanmax(np.abs(s)) if np.isfinite(s).any() else 0.0
    return s / top if top > 0 else np.where(np.isfinite(s), 0.0, np.nan)


def _grid(views: list[LayerView]) -> np.ndarray:
    # never-routed experts are shown as "no data" whatever the criterion gives them
    width = max(v.score.size for v in views)
    grid = np.full((len(views), width), np.nan)
    for i, v in enumerate(views):
        grid[i, : v.score.size] = np.where(v.frequency > 0, layer_normalised(v.score), np.nan)
    return grid


def heatmap(views: list[LayerView], method: str, path: Path) -> None:
    grid = _grid(views)
    rows, cols = grid.shape
    fig, ax = plt.subplots(figsize=(min(16, 3 + cols * 0.25), min(12, 2 + rows * 0.35)), dpi=100)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#e41a1c")
    low = min(0.0, float(np.nanmin(grid))) if np.isfinite(grid).any() else 0.0   # signed criteria go below 0
    im = ax.imshow(grid, aspect="auto", cmap=cmap, interpolation="nearest", vmin=low, vmax=1.0)
    pruned = np.zeros_like(grid, dtype=bool)
    for i, v in enumerate(views):
        pruned[i, v.pruned] = True
    if pruned.any():
        # pruned cells are faded towards white and crossed
        ax.imshow(np.where(pruned, 1.0, np.nan), aspect="auto", cmap="Greys", vmin=0, vmax=10, alpha=0.6,
                  interpolation="nearest")
        if grid.size <= _MARKER_LIMIT:
            r, c = np.nonzero(pruned)
            ax.scatter(c, r, marker="x", s=20, c="black", linewidths=1.0, label="pruned")
    sr = [(i, e) for i, v in enumerate(views) for e in v.super_experts]
    if sr:
        ax.scatter([e for _, e in sr], [i for i, _ in sr], marker="*", s=90, c="red", edgecolors="black",
                   linewidths=0.5, label="super expert (protected)")
    ax.set_yticks(range(rows), [str(v.layer) for v in views])
    ax.set_xlabel("expert id")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"{method} saliency (fraction of layer max); red: never routed" +
                 ("; faded: pruned" if pruned.any() else ""))
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    if pruned.any() or sr:
        ax.legend(loc="upper left", bbox_to_anchor=(1.13, 1.0), frameon=False, fontsize=8)   # right of the colorbar
    _save(fig, path)


def frequency_spread(views: list[LayerView], path: Path) -> None:
    """Share of routed slots each expert gets, per layer: a uniform router puts everyone at 1/E."""
    shares = [v.frequency / max(v.frequency.sum(), 1.0) for v in views]
    fig, ax = plt.subplots(figsize=(min(16, 3 + len(views) * 0.45), 4.5), dpi=100)
    ax.boxplot(shares, positions=range(len(views)), widths=0.6, showfliers=True,
               flierprops={"marker": ".", "markersize": 4}, medianprops={"color": "black"})
    dead = [int((s == 0).sum()) for s in shares]
    for i, s in enumerate(shares):
        ax.hlines(1.0 / s.size, i - 0.4, i + 0.4, colors="tab:blue", linewidth=1.2, linestyles="dashed")
        if dead[i] and len(views) <= _ANNOTATE_LAYERS:
            ax.annotate(f"{dead[i]} never", (i, 0), textcoords="offset points", xytext=(0, -2), ha="center",
                        va="top", fontsize=7, color="tab:red")
    if any(dead) and len(views) > _ANNOTATE_LAYERS:
        # too many layers to label: never-routed counts on their own axis
        twin = ax.twinx()
        twin.plot(range(len(views)), dead, "o", color="tab:red", markersize=3)
        twin.set_ylabel("never-routed experts", color="tab:red")
        twin.set_ylim(bottom=0)
    step = max(1, len(views) // 30)
    ax.set_xticks(range(0, len(views), step), [str(v.layer) for v in views][::step])
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("share of routed slots")
    ax.set_title("Routing frequency spread per layer (dashed blue: uniform 1/E; red: never-routed experts)")
    ax.set_ylim(bottom=-0.08 * max(float(np.max([s.max() for s in shares])), 1e-9))
    _save(fig, path)


def score_distribution(views: list[LayerView], method: str, path: Path) -> None:
    kept, gone = [], []
    for v in views:
        norm = layer_normalised(v.score)
        mask = np.zeros(norm.size, dtype=bool)
        mask[v.pruned] = True
        kept.append(norm[~mask])
        gone.append(norm[mask])
    kept_all, gone_all = np.concatenate(kept), np.concatenate(gone)
    kept_all, gone_all = kept_all[np.isfinite(kept_all)], gone_all[np.isfinite(gone_all)]
    lo = min([0.0] + [float(a.min()) for a in (kept_all, gone_all) if a.size])
    bins = np.linspace(lo, 1.0, 31)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    ax.hist(kept_all, bins=bins, alpha=0.7, label=f"kept ({kept_all.size})", color="tab:green")
    if gone_all.size:
        ax.hist(gone_all, bins=bins, alpha=0.7, label=f"pruned ({gone_all.size})", color="tab:red")
    ax.set_xlabel(f"{method} score (fraction of layer max)")
    ax.set_ylabel("experts")
    ax.set_title("Score distribution: kept vs pruned" if gone_all.size else "Score distribution (no plan)")
    ax.legend()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", metadata=_PNG_META, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def summary_markdown(store: TelemetryStore, views: list[LayerView], method: str, plan: Plan | None,
                     plan_where: str | None, telemetry_fp: str) -> str:
    attrs = store.attrs
    model, calib = attrs.get("model") or {}, attrs.get("calibration") or {}
    lines = ["# reap-stream telemetry report", "",
             f"- telemetry: `{store.path}` ({telemetry_fp})",
             f"- model: {model.get('model_type')} — {len(views)} MoE layers, top_k {model.get('top_k')}, "
             f"fingerprint {model.get('fingerprint')}",
             f"- calibration: {calib.get('num_tokens')} tokens from {calib.get('source')!s}",
             f"- saliency criterion: {method}"]
    if plan is not None:
        gone = sum(len(lp.pruned) for lp in plan.layers.values())
        lines.append(f"- plan: `{plan_where}` — {plan.method}, ratio {plan.ratio}, {gone} experts pruned, "
                     f"{'uniform' if plan.uniform else 'non-uniform'}")
        if (plan.telemetry or {}).get("fingerprint") not in (None, telemetry_fp):
            lines.append("- **note:** the plan was made from other telemetry (fingerprints differ)")
    lines += ["", "| layer | tokens | never routed | max share | min share | CV of frequency | super experts | pruned "
              "| score mass kept |", "|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for v in views:
        share = v.frequency / max(v.frequency.sum(), 1.0)
        cv = float(share.std() / share.mean()) if share.mean() > 0 else 0.0
        finite = np.where(np.isfinite(v.score), v.score, 0.0)
        pos = np.clip(finite, 0, None)
        kept_mass = 1.0 - (pos[v.pruned].sum() / pos.sum()) if pos.sum() > 0 else 1.0
        lines.append(f"| {v.layer} | {v.tokens} | {int((v.frequency == 0).sum())} | {share.max():.3f} | "
                     f"{share.min():.3f} | {cv:.2f} | {', '.join(map(str, v.super_experts)) or '—'} | "
                     f"{len(v.pruned)} | {kept_mass:.1%} |")
    lines += ["", "## Figures", "",
              "![saliency heatmap](heatmap.png)", "",
              "Layer × expert saliency, each layer scaled to its own maximum; pruned experts faded and "
              "crossed, protected super experts starred, never-routed experts red.", "",
              "![routing frequency spread](frequency_spread.png)", "",
              "Share of routed slots per expert, per layer. A tall box means routing concentrates on a few "
              "experts; the dashed blue tick is a perfectly balanced router.", "",
              "![score distribution](score_distribution.png)", "",
              "Scores of kept vs pruned experts (fraction of the layer maximum). Overlap means the criterion "
              "separates poorly; pruned mass near 1 means a costly cut.", ""]
    return "\n".join(lines)


def write_report(store: TelemetryStore, out: Path, *, plan: Plan | None = None, plan_where: str | None = None,
                 method: str | None = None) -> list[Path]:
    """Write report.md and the figures into `out`; return the paths written."""
    if method is None:
        method = plan.method if plan and plan.method in METHODS else "reap"
    if method not in METHODS:
        raise BadInput("--method", f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    views, telemetry_fp = load_views(store, method, plan, plan_where or "plan")
    if not views:
        raise BadInput(store.path, "telemetry has no committed layers")
    out.mkdir(parents=True, exist_ok=True)
    heatmap(views, method, out / FIGURES[0])
    frequency_spread(views, out / FIGURES[1])
    score_distribution(views, method, out / FIGURES[2])
    md = out / "report.md"
    write_text_atomic(md, summary_markdown(store, views, method, plan, plan_where, telemetry_fp))
    return [md] + [out / f for f in FIGURES]
