"""`reap-stream full` (collect -> plan -> apply, resumable) and `reap-stream demo`."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import click

from ..telemetry.calibration import CalibrationOptions, calibration_options
from ..planning.criteria import METHODS
from ..errors import BadInput
from ..planning.planner import BUDGETS
from ..runner.stream import MODES, check_chunk_tokens


def run_full(model: Path, calibration: CalibrationOptions, out: Path, *, method: str = "reap",
             ratio: float | None = None, n_prune: int | None = None, keep: int | None = None,
             work_dir: Path | None = None, mode: str = "stream", chunk_tokens: int = 4096,
             renorm_topk: bool = True, min_experts: int = 1, preserve_super_experts: bool = True,
             budget: str = "uniform", seed: int = 0, max_shard_bytes: int | None = None,
             overwrite: bool = False, progress: bool = True) -> dict:
    """Collect, plan and apply. Each step's result lands in `work_dir` (default: OUT.reap-work
    beside OUT) before the next starts, so a rerun of the same command picks up where it stopped:
    collect resumes at its last committed layer, a finished telemetry store is reused, and an
    output already written from the same plan is left as it is."""
    from ..surgery.safetensors import DEFAULT_MAX_SHARD, PLAN_COPY_NAME, check_output_path, plan_layout, write_layout
    from ..telemetry.calibration import build_calibration
    from ..io.safetensors import Checkpoint
    from ..telemetry.collect import CollectOptions, collect
    from .collect import load_tokenizer
    from ..planning.planner import make_plan
    from ..families.structure import checkpoint_structure
    from ..telemetry.store import TelemetryStore

    check_chunk_tokens(chunk_tokens)
    model, out = Path(model), Path(out)
    work = Path(work_dir) if work_dir else out.with_name(out.name + ".reap-work")
    ckpt = Checkpoint.open(model)
    checkpoint_structure(ckpt)
    previous = out / PLAN_COPY_NAME
    if out.exists() and not previous.is_file() and not overwrite:
        raise BadInput(out, "output exists and is not a reap-stream output; pass --overwrite to replace it")
    check_output_path(model, out, overwrite=True)

    calib = build_calibration(calibration, load_tokenizer(model))
    telemetry = work / "telemetry.zarr"
    collected = collect(ckpt, calib, telemetry, work / "collect",
                        CollectOptions(mode=mode, renorm_topk=renorm_topk, chunk_tokens=chunk_tokens),
                        progress=progress)
    plan = make_plan(TelemetryStore.open(telemetry), method=method, ratio=ratio, n_prune=n_prune, keep=keep,
                     min_experts=min_experts, preserve_super_experts=preserve_super_experts, budget=budget,
                     seed=seed, config=ckpt.config)
    plan_path = work / "plan.json"
    plan.save(plan_path)

    summary = {"out": str(out), "work_dir": str(work), "telemetry": str(telemetry), "plan": str(plan_path),
               "collect": collected, "kept_per_layer": {str(k): len(v.kept) for k, v in sorted(plan.layers.items())}}
    if previous.is_file():
        if previous.read_text() == plan.dumps():
            summary["apply"] = "already complete"
            return summary
        if not overwrite:
            raise BadInput(out, f"holds a prune made from another plan; pass --overwrite to replace it "
                                f"(this run's plan: {plan_path})")
    layout = plan_layout(ckpt, plan, max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD, plan_where=str(plan_path))
    write_layout(layout, out, overwrite=True, progress=progress)
    summary["apply"] = layout.summary()
    return summary


def _plan_options(f):
    for deco in reversed([
        click.option("--method", type=click.Choice(METHODS), default="reap", show_default=True),
        click.option("--ratio", type=float, default=None, help="Fraction of routed experts pruned per layer."),
        click.option("--n-prune", type=int, default=None, help="Experts pruned per layer."),
        click.option("--keep", type=int, default=None, help="Experts kept per layer."),
        click.option("--min-experts", type=int, default=1, show_default=True),
        click.option("--preserve-super-experts/--no-preserve-super-experts", default=True, show_default=True),
        click.option("--budget", type=click.Choice(BUDGETS), default="uniform", show_default=True),
        click.option("--plan-seed", "plan_seed", type=int, default=0, show_default=True, help="Seed of the random method (--seed shuffles the calibration rows)."),
    ]):
        f = deco(f)
    return f


@click.command("full")
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@calibration_options
@_plan_options
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Pruned model directory.")
@click.option("--work-dir", type=click.Path(path_type=Path), default=None,
              help="Telemetry, plan and resume state (default: OUT.reap-work beside OUT).")
@click.option("--mode", type=click.Choice(MODES), default="stream", show_default=True)
@click.option("--chunk-tokens", type=int, default=4096, show_default=True)
@click.option("--renorm-topk/--no-renorm-topk", default=True, show_default=True)
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing output that is not this run's.")
@click.option("--json", "as_json", is_flag=True)
def full_cmd(model: Path, calibration: CalibrationOptions, method: str, ratio, n_prune, keep, min_experts: int,
             preserve_super_experts: bool, budget: str, plan_seed: int, out: Path, work_dir: Path | None, mode: str,
             chunk_tokens: int, renorm_topk: bool, max_shard_size: str, overwrite: bool, as_json: bool) -> None:
    """Collect telemetry, plan and apply in one resumable run."""
    from .apply import parse_size
    from ..blas import blas_info, ensure_blas

    ensure_blas()  # before the first `import mlx`
    summary = run_full(model, calibration, out, method=method, ratio=ratio, n_prune=n_prune, keep=keep,
                       work_dir=work_dir, mode=mode, chunk_tokens=chunk_tokens, renorm_topk=renorm_topk,
                       min_experts=min_experts, preserve_super_experts=preserve_super_experts, budget=budget,
                       seed=plan_seed, max_shard_bytes=parse_size(max_shard_size), overwrite=overwrite,
                       progress=not as_json)
    summary["blas"] = blas_info()
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
    else:
        counts = sorted(set(summary["kept_per_layer"].values()))
        click.echo(f"pruned {model} -> {out} ({method}; experts kept per layer: {', '.join(map(str, counts))}); "
                   f"telemetry and plan in {summary['work_dir']}")


def demo_calibration_text() -> str:
    """Real text present on every machine: a few standard-library modules' source."""
    import argparse
    import json as json_mod
    import textwrap

    return "\n".join(inspect.getsource(m) for m in (argparse, json_mod.decoder, textwrap))


@click.command("demo")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reap-stream-demo"), show_default=True)
@click.option("--family", default="qwen3_moe", show_default=True, help="Tiny model family to generate.")
@click.option("--ratio", type=float, default=0.5, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def demo_cmd(out: Path, family: str, ratio: float, as_json: bool) -> None:
    """Generate a tiny MoE, prune it with REAP end to end, and check the result.

    Writes OUT/model (the generated model), OUT/pruned (its REAP prune) and OUT/work (telemetry and
    plan), then checks
    that mlx_lm loads the pruned model and that its logits equal the original's with the pruned
    experts masked out of routing.
    """
    import numpy as np

    from ..blas import ensure_blas

    ensure_blas()  # before synth imports mlx
    from ..testing import synth
    from ..families.masking import masked_logits
    from ..planning.plan import Plan
    from ..surgery.verify import verify_output

    if family not in synth.FAMILIES:
        raise BadInput("--family", f"unknown family {family!r}; choose from {', '.join(synth.FAMILIES)}")
    out.mkdir(parents=True, exist_ok=True)
    model = out / "model"
    if not (model / "config.json").exists():
        synth.make_mlx_fixture(family, model)
    text = out / "calibration.txt"
    text.write_text(demo_calibration_text())
    calib = CalibrationOptions(dataset_file=str(text), dataset_format="text", max_tokens=4096,
                               pack_samples=True, window_tokens=256)
    summary = run_full(model, calib, out / "pruned", ratio=ratio, work_dir=out / "work", progress=not as_json)

    from mlx_lm import load
    import mlx.core as mx

    pruned_model, tok = load(str(out / "pruned"))
    ids = np.array(tok.encode("def parse_args(self, args=None, namespace=None):"))
    got = np.array(pruned_model(mx.array(ids[None]))[0].astype(mx.float32))
    pruned = Plan.load(summary["plan"]).pruned_map()
    want = masked_logits(model, pruned, ids)
    checked = verify_output(out / "pruned")
    summary["max_abs_logit_diff_vs_masked_original"] = float(np.max(np.abs(got - want)))
    summary["verify"] = "ok" if checked["ok"] else checked["findings"]
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True, default=str))
    else:
        click.echo(f"demo: pruned {family} at ratio {ratio} -> {out / 'pruned'}; "
                   f"max |logit diff| vs masked original = {summary['max_abs_logit_diff_vs_masked_original']:.2e}; "
                   f"verify: {summary['verify']}")
    if not checked["ok"] or summary["max_abs_logit_diff_vs_masked_original"] > 1e-5:
        raise SystemExit(1)
