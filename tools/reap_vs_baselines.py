"""REAP against its baselines on the trained tiny MoE: held-out perplexity after pruning.

    nice -n 10 python tools/reap_vs_baselines.py            # writes docs/reap_vs_baselines.{md,png,json}

For the model in fixtures/trained (tools/train_tiny_moe.py): collect telemetry once on the
calibration split, then for each ratio and method: `plan`, `apply`, `eval` of the pruned output on
the held-out split, and `eval --mask-plan` of the original on the same text, which must give the
same perplexity (the masked original is what the plan promises). Everything goes through the
`reap-stream` command line, exactly as a user runs it. Steps already done in --work-dir are
reused (delete it to start over); the results are deterministic, so a rerun writes the same files.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("reap", "frequency", "weighted_frequency_sum", "ean_sum")
RANDOM_SEEDS = (0, 1, 2)
RATIOS = (0.25, 0.5)
WINDOW = 256
# masked original vs pruned output: the same function, so only float rounding may differ
MASK_REL_TOL = 1e-5


def cli(*args: str | Path) -> dict:
    """Run `reap-stream ARGS --json` and return its JSON summary (stops the study on failure)."""
    cmd = [sys.executable, "-c", "from reap_stream.cli import main; main()", *map(str, args), "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"reap_vs_baselines: failed: reap-stream {' '.join(map(str, args))}\n{res.stderr.strip()}")
    text = res.stdout.strip()
    try:
        return json.loads(text)  # some commands pretty-print
    except ValueError:
        return json.loads(text.splitlines()[-1])  # others print progress lines first


def cached(path: Path, make) -> dict:
    """Result of `make()`, kept as JSON in `path` so a rerun skips finished steps."""
    if path.exists():
        return json.loads(path.read_text())
    out = make()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return out


def text_args(path: Path, max_tokens: int) -> list[str]:
    return ["--dataset-file", str(path), "--pack-samples", "--window-tokens", str(WINDOW),
            "--max-tokens", str(max_tokens)]


def run_case(model: Path, telemetry: Path, heldout: list[str], work: Path, method: str, ratio: float,
             seed: int) -> dict:
    name = f"{method}-r{ratio}" + (f"-s{seed}" if method == "random" else "")
    case = work / name
    case.mkdir(parents=True, exist_ok=True)
    plan = case / "plan.json"
    cached(case / "plan.summary.json",
           lambda: cli("plan", telemetry, "--method", method, "--ratio", ratio, "--seed", seed, "--model", model,
                       "--out", plan))
    pruned = case / "pruned"
    applied = cached(case / "apply.summary.json",
           lambda: cli("apply", model, plan, "--out", pruned, "--overwrite", "--quiet"))
    after = cached(case / "eval.pruned.json", lambda: cli("eval", pruned, *heldout))
    masked = cached(case / "eval.masked.json", lambda: cli("eval", model, *heldout, "--mask-plan", plan))
    return {"name": name, "method": method, "ratio": ratio, "seed": seed if method == "random" else None,
            "ppl_pruned": after["perplexity"], "ppl_masked": masked["perplexity"],
            "mask_rel_diff": abs(after["perplexity"] - masked["perplexity"]) / after["perplexity"],
            "experts_kept": sorted(set(applied["kept_per_layer"].values()))}


def summarise(rows: list[dict], original: float) -> list[dict]:
    """One line per (ratio, method); random as mean ± sample std over its seeds."""
    out = []
    for ratio in RATIOS:
        for method in (*METHODS, "random"):
            vals = [r["ppl_pruned"] for r in rows if r["ratio"] == ratio and r["method"] == method]
            out.append({"ratio": ratio, "method": method, "ppl": statistics.fmean(vals),
                        "std": statistics.stdev(vals) if len(vals) > 1 else None, "runs": len(vals),
                        "ratio_to_original": statistics.fmean(vals) / original})
    return out


def markdown(summary: list[dict], rows: list[dict], meta: dict) -> str:
    lines = [
        "# REAP vs baselines on the trained tiny MoE",
        "",
        f"Model: `{meta['model']}` ({meta['model_desc']}). Calibration: {meta['calib_tokens']:,} tokens of "
        f"the calibration split; held-out perplexity on {meta['heldout_predictions']:,} predicted tokens "
        f"(windows of {WINDOW}). Original model: **{meta['ppl_original']:.3f}**.",
        "",
        "| ratio | method | held-out ppl | × original |",
        "|---|---|---|---|",
    ]
    for s in summary:
        ppl = f"{s['ppl']:.3f}" + (f" ± {s['std']:.3f} ({s['runs']} seeds)" if s["std"] is not None else "")
        best = min(x["ppl"] for x in summary if x["ratio"] == s["ratio"])
        if s["ppl"] == best:
            ppl = f"**{ppl}**"
        lines.append(f"| {s['ratio']:.2f} | {s['method']} | {ppl} | {s['ratio_to_original']:.3f} |")
    worst = max(r["mask_rel_diff"] for r in rows)
    lines += [
        "",
        f"`eval --mask-plan` on the original vs `eval` of the pruned output, all {len(rows)} plans: "
        f"largest relative perplexity difference {worst:.2e} "
        + ("(bit-identical)." if worst == 0 else "(equal within float rounding)." if worst <= MASK_REL_TOL
           else f"(**exceeds {MASK_REL_TOL:g}**)."),
        "",
        "Reproduce: `nice -n 10 python tools/reap_vs_baselines.py` (see docs/eval.md).",
        "",
    ]
    return "\n".join(lines)


def plot(summary: list[dict], rows: list[dict], original: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "reap-stream"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    methods = (*METHODS, "random")
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(RATIOS))]
        ys = [next(s["ppl"] for s in summary if s["ratio"] == r and s["method"] == method) for r in RATIOS]
        errs = [next(s["std"] or 0.0 for s in summary if s["ratio"] == r and s["method"] == method) for r in RATIOS]
        ax.bar(xs, ys, width, yerr=errs if method == "random" else None, label=method, capsize=3)
    ax.axhline(original, color="black", linestyle="--", linewidth=1, label="original")
    ax.set_xticks(range(len(RATIOS)), [f"{r:.0%} experts pruned" for r in RATIOS])
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.set_ylim(bottom=original * 0.9)  # bars start near the original: differences stay visible
    ax.set_title("Expert pruning criteria on a 32-expert, top-2 Qwen3-MoE trained on Python stdlib")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8, ncols=2)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, metadata={"Software": None})  # no version stamp: same results, same bytes
    plt.close(fig)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=REPO / "fixtures" / "trained")
    ap.add_argument("--work-dir", type=Path, default=REPO / "build" / "reap_vs_baselines")
    ap.add_argument("--out-dir", type=Path, default=REPO / "docs")
    ap.add_argument("--calib-tokens", type=int, default=65536)
    ap.add_argument("--heldout-tokens", type=int, default=32768)
    args = ap.parse_args(argv)

    model, work = args.model, args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    calib = text_args(model / "data" / "calib.txt", args.calib_tokens)
    heldout = text_args(model / "data" / "heldout.txt", args.heldout_tokens)
    telemetry = work / "telemetry.zarr"
    collected = cached(work / "collect.summary.json", lambda: cli("collect", model, *calib, "--out", telemetry))
    original = cached(work / "eval.original.json", lambda: cli("eval", model, *heldout))

    rows = []
    for ratio in RATIOS:
        for method in METHODS:
            rows.append(run_case(model, telemetry, heldout, work, method, ratio, 0))
        for seed in RANDOM_SEEDS:
            rows.append(run_case(model, telemetry, heldout, work, "random", ratio, seed))
        for r in rows[-len(METHODS) - len(RANDOM_SEEDS):]:
            print(f"{r['name']:>28}: ppl {r['ppl_pruned']:.3f} (masked original {r['ppl_masked']:.3f})", flush=True)

    cfg = json.loads((model / "config.json").read_text())
    meta = {
        "model": str(model.relative_to(REPO)) if model.is_relative_to(REPO) else str(model),
        "model_desc": f"{cfg['model_type']}, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
                      f"{cfg['num_experts']} experts, top-{cfg['num_experts_per_tok']}",
        "calib_tokens": collected.get("num_tokens", 0),
        "heldout_predictions": original["num_predictions"],
        "ppl_original": original["perplexity"],
    }
    summary = summarise(rows, original["perplexity"])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "reap_vs_baselines.md").write_text(markdown(summary, rows, meta))
    (args.out_dir / "reap_vs_baselines.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "runs": rows}, indent=1, sort_keys=True) + "\n")
    plot(summary, rows, original["perplexity"], args.out_dir / "reap_vs_baselines.png")
    print((args.out_dir / "reap_vs_baselines.md").read_text())
    worst = max(r["mask_rel_diff"] for r in rows)
    return 0 if worst <= MASK_REL_TOL else 1


if __name__ == "__main__":
    sys.exit(main())
