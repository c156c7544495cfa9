"""`reap-stream eval` (perplexity, optionally with a plan's experts masked) and `reap-stream compare`
(logit difference between two models)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, TypeVar

import click

from ..telemetry.calibration import CalibrationOptions, calibration_options
from .collect import open_and_tokenise
from ..runner.stream import MODES, check_chunk_tokens

F = TypeVar("F", bound=Callable)

_run_options = (
    click.option("--mask-plan", type=click.Path(path_type=Path), default=None,
                 help="Evaluate as if this plan's pruned experts were gone (masked from routing; "
                      "in compare, from MODEL_A's routing: e.g. the original vs its pruned output)."),
    click.option("--ignore-fingerprint", is_flag=True,
                 help="Accept a --mask-plan made for another copy of the same structure."),
    click.option("--mode", type=click.Choice(MODES), default="stream", show_default=True,
                 help="stream: layer by layer, one layer in memory; memory: whole model (baseline)."),
    click.option("--work-dir", type=click.Path(path_type=Path), default=None,
                 help="Where hidden states are spilled (default: the system temp dir); removed afterwards."),
    click.option("--chunk-tokens", type=int, default=4096, show_default=True,
                 help="Tokens per activation chunk (whole sequences of equal length are batched)."),
    click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout."),
)


def run_options(command: F) -> F:
    """The options eval and compare share (masking, execution mode, spill dir, chunking, --json)."""
    for option in reversed(_run_options):
        command = option(command)
    return command


@click.command("eval")
@click.argument("model_dir", type=click.Path(path_type=Path))
@calibration_options
@run_options
def eval_cmd(model_dir: Path, calibration: CalibrationOptions, mask_plan: Path | None, ignore_fingerprint: bool,
             mode: str, work_dir: Path | None, chunk_tokens: int, as_json: bool) -> None:
    """Perplexity of MODEL_DIR on --prompt / --dataset-file text, computed layer by layer."""
    from ..eval import mask_from_plan, perplexity

    check_chunk_tokens(chunk_tokens)
    ckpt, calib = open_and_tokenise(model_dir, calibration)
    mask = mask_from_plan(mask_plan, ckpt, ignore_fingerprint=ignore_fingerprint) if mask_plan else None
    result = perplexity(ckpt, calib.sequences, mask=mask, mode=mode, work_dir=work_dir,
                        chunk_tokens=chunk_tokens, max_batch=calib.batch_size, progress=not as_json,
                        where=calibration.where)
    if as_json:
        summary = {"model": str(model_dir), "mask_plan": None if mask_plan is None else str(mask_plan),
                   "masked_experts": {str(k): v for k, v in sorted((mask or {}).items())},
                   "mode": mode, "calibration": calib.summary(), **result.to_json()}
        click.echo(json.dumps(summary, sort_keys=True))
    else:
        masked = sum(len(v) for v in (mask or {}).values())
        note = f" with {masked} experts masked by {mask_plan}" if mask_plan else ""
        click.echo(f"perplexity {result.perplexity:.4f} (mean NLL {result.mean_nll:.5f}) over "
                   f"{result.num_predictions} predicted tokens{note}")


@click.command("compare")
@click.argument("model_a", type=click.Path(path_type=Path))
@click.argument("model_b", type=click.Path(path_type=Path))
@calibration_options
@run_options
def compare_cmd(model_a: Path, model_b: Path, calibration: CalibrationOptions, mask_plan: Path | None,
                ignore_fingerprint: bool, mode: str, work_dir: Path | None, chunk_tokens: int, as_json: bool) -> None:
    """Max and mean |logit difference| of MODEL_A and MODEL_B on the same tokens (A's tokenizer)."""
    from ..io.safetensors import Checkpoint
    from ..eval import compare_logits, mask_from_plan
    from ..families.structure import checkpoint_structure

    check_chunk_tokens(chunk_tokens)
    ckpt_b = Checkpoint.open(model_b)
    checkpoint_structure(ckpt_b)  # refuse a bad B before the work on A
    ckpt_a, calib = open_and_tokenise(model_a, calibration)
    mask = mask_from_plan(mask_plan, ckpt_a, ignore_fingerprint=ignore_fingerprint) if mask_plan else None
    diff = compare_logits(ckpt_a, ckpt_b, calib.sequences, mask_a=mask, mode=mode, work_dir=work_dir,
                          chunk_tokens=chunk_tokens, max_batch=calib.batch_size, progress=not as_json)
    if as_json:
        summary = {"model_a": str(model_a), "model_b": str(model_b),
                   "mask_plan": None if mask_plan is None else str(mask_plan), "mode": mode,
                   "calibration": calib.summary(), **diff.to_json()}
        click.echo(json.dumps(summary, sort_keys=True))
    else:
        click.echo(f"max |logit diff| {diff.max_abs_diff:.6g}, mean {diff.mean_abs_diff:.6g}, "
                   f"top-1 agreement {diff.top1_agreement:.4f} over {diff.num_tokens} tokens")
