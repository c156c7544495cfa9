"""`reap-stream parity LEFT RIGHT`: do two telemetry stores agree, and does it matter for the plan?"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..planning.planner import PlanOptions
from .options import PATH, plan_options


@click.command("parity")
@click.argument("left", type=PATH)
@click.argument("right", type=PATH)
@plan_options
@click.option("--require-identical-telemetry", is_flag=True,
              help="Fail unless the telemetry is bit-identical (not merely the same prune sets).")
@click.option("--out", required=True, type=PATH, help="Directory for parity.json and parity.md.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report.")
def parity_cmd(left: Path, right: Path, plan_options: PlanOptions, require_identical_telemetry: bool, out: Path,
               as_json: bool) -> None:
    """Compare telemetry stores LEFT and RIGHT; exit 1 when they disagree on what to prune."""
    from ..errors import BadInput
    from ..io.files import write_text_atomic
    from ..io.lock import exclusive
    from ..planning.parity import compare, to_markdown
    from ..telemetry.store import TelemetryStore

    report = compare(TelemetryStore.open(left), TelemetryStore.open(right), plan_options,
                     require_identical_telemetry=require_identical_telemetry)
    if out.exists() and not out.is_dir():
        raise BadInput(out, "output exists and is not a directory")
    with exclusive(out, "parity report"):
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "parity.json", json.dumps(report, indent=1, sort_keys=True) + "\n")
        write_text_atomic(out / "parity.md", to_markdown(report))
    if as_json:
        click.echo(json.dumps(report, indent=1, sort_keys=True))
    else:
        f = report["first_difference"]
        first = f" (first difference: layer {f['layer']} {f['array']} row {f['row']})" if f else ""
        click.echo(f"parity {report['verdict']}{first}: {'PASS' if report['passed'] else 'FAIL'}; wrote {out}/parity.md")
    if not report["passed"]:
        sys.exit(1)
