"""`reap-stream demo`: generate a tiny MoE, prune it end to end, check the result."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import click

from .options import PATH


def demo_calibration_text() -> str:
    """Real text present on every machine: a few standard-library modules' source."""
    import argparse
    import json as json_mod
    import textwrap

    return "\n".join(inspect.getsource(m) for m in (argparse, json_mod.decoder, textwrap))


@click.command("demo")
@click.option("--out", type=PATH, default=Path("reap-stream-demo"), show_default=True)
@click.option("--family", default="qwen3_moe", show_default=True, help="Tiny model family to generate.")
@click.option("--ratio", type=float, default=0.5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def demo_cmd(out: Path, family: str, ratio: float, as_json: bool) -> None:
    """Generate a tiny MoE, prune it with REAP end to end, and check the result.

    Writes OUT/model (the generated model), OUT/pruned (its REAP prune) and OUT/work (telemetry and
    plan), then checks that mlx_lm loads the pruned model and that its logits equal the original's
    with the pruned experts masked out of routing.
    """
    from ..blas import ensure_blas

    ensure_blas()  # before synth imports mlx
    from ..errors import BadInput
    from ..io.lock import exclusive
    from ..runner.distributed import world
    from ..testing import synth

    if world().size > 1:
        raise BadInput("demo", "runs in one process; start it without mlx.launch")
    if family not in synth.FAMILIES:
        raise BadInput("--family", f"unknown family {family!r}; choose from {', '.join(synth.FAMILIES)}")
    with exclusive(out, "demo directory"):
        _demo(out, family, ratio, as_json)


def _demo(out: Path, family: str, ratio: float, as_json: bool) -> None:
    import numpy as np

    from ..families.masking import masked_logits
    from ..families.model import open_model
    from ..pipeline import run_full
    from ..planning.plan import Plan
    from ..planning.planner import PlanOptions
    from ..runner.chunks import RunOptions
    from ..surgery.verify import verify_output
    from ..telemetry.calibration import CalibrationOptions
    from ..testing import synth

    out.mkdir(parents=True, exist_ok=True)
    model = out / "model"
    if not (model / "config.json").exists():
        synth.make_mlx_fixture(family, model)
    text = out / "calibration.txt"
    text.write_text(demo_calibration_text())
    calib = CalibrationOptions(dataset_file=str(text), dataset_format="text", max_tokens=4096,
                               pack_samples=True, window_tokens=256)
    summary = run_full(open_model(model), calib, out / "pruned", PlanOptions("reap", ratio=ratio),
                       RunOptions(work_dir=out / "work"), progress=not as_json)

    import mlx.core as mx
    from mlx_lm import load

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
