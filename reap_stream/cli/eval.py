"""`reap-stream eval` (perplexity, optionally with a plan's experts masked) and `reap-stream compare`
(logit difference between two models)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..runner.chunks import RunOptions
from ..telemetry.calibration import CalibrationOptions
from .options import PATH, calibration_options, run_options

_mask_plan = click.option(
    "--mask-plan", type=PATH, default=None,
    help="Evaluate as if this plan's pruned experts were gone (masked from routing; in compare, from "
         "MODEL_A's routing: e.g. the original vs its pruned output).")
_ignore_fingerprint = click.option("--ignore-fingerprint", is_flag=True,
                                   help="Accept a --mask-plan made for another copy of the same structure.")
_json = click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")


def _open(path: Path, calibration: CalibrationOptions | None = None):
    """The resolved model (one mlx_lm can run: safetensors or GGUF), and the calibration tokenised with
    its tokenizer when `calibration` is given."""
    from ..blas import ensure_blas

    ensure_blas()  # before the first `import mlx`
    from ..families.model import open_model
    from ..telemetry.tokenizer import tokenise

    model = open_model(path)
    model.require_runnable("eval and compare")
    return model, (tokenise(model, calibration) if calibration is not None else None)


@click.command("eval")
@click.argument("model_dir", type=PATH)
@calibration_options
@run_options
@_mask_plan
@_ignore_fingerprint
@_json
def eval_cmd(model_dir: Path, calibration: CalibrationOptions, run: RunOptions, mask_plan: Path | None,
             ignore_fingerprint: bool, as_json: bool) -> None:
    """Perplexity of MODEL_DIR (a model directory or a GGUF file) on --prompt / --dataset-file text, layer by layer."""
    from ..eval import mask_from_plan, perplexity
    from ..runner.distributed import world

    model, calib = _open(model_dir, calibration)
    mask = mask_from_plan(mask_plan, model, ignore_fingerprint=ignore_fingerprint) if mask_plan else None
    result = perplexity(model, calib.sequences, run, mask=mask, progress=not as_json, where=calibration.where)
    if world().rank > 0:
        return   # every rank has the result; rank 0 reports it
    if as_json:
        summary = {"model": str(model_dir), "mask_plan": None if mask_plan is None else str(mask_plan),
                   "masked_experts": {str(k): v for k, v in sorted((mask or {}).items())},
                   "mode": run.mode, "calibration": calib.summary(), **result.to_json()}
        click.echo(json.dumps(summary, sort_keys=True))
    else:
        masked = sum(len(v) for v in (mask or {}).values())
        note = f" with {masked} experts masked by {mask_plan}" if mask_plan else ""
        click.echo(f"perplexity {result.perplexity:.4f} (mean NLL {result.mean_nll:.5f}) over "
                   f"{result.num_predictions} predicted tokens{note}")


@click.command("compare")
@click.argument("model_a", type=PATH)
@click.argument("model_b", type=PATH)
@calibration_options
@run_options
@_mask_plan
@_ignore_fingerprint
@_json
def compare_cmd(model_a: Path, model_b: Path, calibration: CalibrationOptions, run: RunOptions,
                mask_plan: Path | None, ignore_fingerprint: bool, as_json: bool) -> None:
    """Max and mean |logit difference| of MODEL_A and MODEL_B on the same tokens (A's tokenizer)."""
    from ..eval import compare_logits, mask_from_plan

    b, _ = _open(model_b)  # refuse a bad B before the work on A
    a, calib = _open(model_a, calibration)
    mask = mask_from_plan(mask_plan, a, ignore_fingerprint=ignore_fingerprint) if mask_plan else None
    diff = compare_logits(a, b, calib.sequences, run, mask_a=mask, progress=not as_json)
    if as_json:
        summary = {"model_a": str(model_a), "model_b": str(model_b),
                   "mask_plan": None if mask_plan is None else str(mask_plan), "mode": run.mode,
                   "calibration": calib.summary(), **diff.to_json()}
        click.echo(json.dumps(summary, sort_keys=True))
    else:
        click.echo(f"max |logit diff| {diff.max_abs_diff:.6g}, mean {diff.mean_abs_diff:.6g}, "
                   f"top-1 agreement {diff.top1_agreement:.4f} over {diff.num_tokens} tokens")
