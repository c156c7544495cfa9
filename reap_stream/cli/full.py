"""`reap-stream full`: collect -> plan -> apply in one resumable run."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..planning.planner import PlanOptions
from ..runner.chunks import RunOptions
from ..telemetry.calibration import CalibrationOptions
from .options import PATH, calibration_options, manifest_hash_option, max_shard_option, plan_options, run_options


@click.command("full")
@click.argument("model_path", metavar="MODEL", type=PATH)
@calibration_options
@plan_options
@run_options
@click.option("--out", required=True, type=PATH,
              help="Pruned model directory (a .gguf file when MODEL is a GGUF).")
@click.option("--renorm-topk/--no-renorm-topk", default=True, show_default=True,
              help="Router weight g = probability divided by the token's top-k sum (the reference's default).")
@max_shard_option
@manifest_hash_option
@click.option("--overwrite", is_flag=True, help="Replace an existing output that is not this run's.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def full_cmd(model_path: Path, calibration: CalibrationOptions, plan_options: PlanOptions, run: RunOptions, out: Path,
             renorm_topk: bool, max_shard_bytes: int, manifest_hash: str, overwrite: bool, as_json: bool) -> None:
    """Collect telemetry, plan and apply in one resumable run (a GGUF MODEL gives a GGUF --out)."""
    from ..blas import blas_info, ensure_blas

    ensure_blas()  # before the first `import mlx`
    from ..families.model import open_model
    from ..pipeline import run_full

    summary = run_full(open_model(model_path), calibration, out, plan_options, run, renorm_topk=renorm_topk,
                       max_shard_bytes=max_shard_bytes, overwrite=overwrite, progress=not as_json,
                       manifest_hash=manifest_hash)
    if summary["collect"].get("distributed", {}).get("rank", 0) > 0:
        return   # rank 0 plans, applies and reports
    summary["blas"] = blas_info()
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
    else:
        counts = sorted(set(summary["kept_per_layer"].values()))
        click.echo(f"pruned {model_path} -> {out} ({plan_options.method}; experts kept per layer: "
                   f"{', '.join(map(str, counts))}); telemetry and plan in {summary['work_dir']}")
