"""`reap-stream plan`: telemetry -> plan.json."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..planning.planner import PlanOptions
from .options import PATH, plan_options


@click.command("plan")
@click.argument("telemetry", type=PATH)
@click.option("--out", required=True, type=PATH, help="Plan JSON to write.")
@plan_options
@click.option("--model", "model_path", type=PATH,
              help="Source model: checks the telemetry belongs to it and leaves its hash/MTP layers whole.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def plan_cmd(telemetry: Path, out: Path, plan_options: PlanOptions, model_path: Path | None, as_json: bool) -> None:
    """Choose the experts to prune from TELEMETRY and write a plan."""
    from ..errors import BadInput
    from ..families.model import open_model
    from ..io.lock import exclusive
    from ..planning.planner import check_store_model, make_plan
    from ..telemetry.store import TelemetryStore

    store = TelemetryStore.open(telemetry)
    if out.is_dir() or not out.parent.is_dir():
        raise BadInput(out, "is a directory" if out.is_dir() else f"directory {out.parent} does not exist")
    frozen: list[int] = []
    if model_path is not None:
        model = open_model(model_path)
        check_store_model(store, model)
        frozen = model.structure.frozen_layers
    plan = make_plan(store, plan_options, frozen=frozen, progress=not as_json)
    with exclusive(out, "plan"):
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
