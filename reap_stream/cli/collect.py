"""`reap-stream collect` and `reap-stream merge`."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..runner.chunks import RunOptions
from ..telemetry.calibration import CalibrationOptions
from .options import PATH, calibration_options, run_options


@click.command("collect")
@click.argument("model_dir", type=PATH)
@calibration_options
@run_options
@click.option("--out", type=PATH, required=True, help="Telemetry store to write (Zarr).")
@click.option("--layers", "layers_spec", default=None, help="MoE layers to record, e.g. 0-3,8 (default: all).")
@click.option("--renorm-topk/--no-renorm-topk", default=True, show_default=True,
              help="Router weight g = probability divided by the token's top-k sum (the reference's default).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def collect_cmd(model_dir: Path, calibration: CalibrationOptions, run: RunOptions, out: Path,
                layers_spec: str | None, renorm_topk: bool, as_json: bool) -> None:
    """Collect REAP telemetry of MODEL_DIR (a model directory or a GGUF file) on calibration text into --out."""
    from ..blas import blas_info, ensure_blas

    ensure_blas()  # before the first `import mlx`
    from ..families.model import open_model
    from ..telemetry.collect import CollectOptions, collect, parse_layers
    from ..telemetry.tokenizer import tokenise

    options = CollectOptions(layers=parse_layers(layers_spec), renorm_topk=renorm_topk)
    model = open_model(model_dir)  # an unknown model_type or no MoE is refused before tokenising
    model.require_runnable("collect")
    calib = tokenise(model, calibration)
    summary = collect(model, calib, out, run, options, progress=not as_json)
    if summary.get("distributed", {}).get("rank", 0) > 0:
        return   # rank 0 reports for the group
    summary["blas"] = blas_info()
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))
    else:
        click.echo(f"collected {len(summary['layers'])} MoE layers into {summary['out']}"
                   + (f" ({summary['tokens_per_s']} tokens/s)" if summary.get("tokens_per_s") else ""))


@click.command("merge")
@click.argument("stores", nargs=-1, required=True, type=PATH)
@click.option("--out", type=PATH, required=True, help="Merged telemetry store.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def merge_cmd(stores: tuple[Path, ...], out: Path, as_json: bool) -> None:
    """Add telemetry stores of one model collected on disjoint calibration shards."""
    from ..telemetry.collect import merge

    summary = merge(list(stores), out)
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))
    else:
        click.echo(f"merged {len(stores)} stores ({summary['num_tokens']} tokens) into {out}")
