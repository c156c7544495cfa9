"""`reap-stream parity LEFT RIGHT`: do two telemetry stores agree, and does it matter for the plan?"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..planning.criteria import METHODS
from ..errors import BadInput
from ..planning.parity import compare, to_markdown
from ..io.files import write_text_atomic
from ..telemetry.store import TelemetryStore


def prepare_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise BadInput(out, "output exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)


@click.command("parity")
@click.argument("left", type=click.Path(path_type=Path))
@click.argument("right", type=click.Path(path_type=Path))
@click.option("--method", required=True, type=click.Choice(METHODS), help="Criterion the plans compare under.")
@click.option("--ratio", type=float, help="Fraction of experts pruned per layer.")
@click.option("--n-prune", type=int, help="Experts pruned per layer.")
@click.option("--require-identical-telemetry", is_flag=True,
              help="Fail unless the telemetry is bit-identical (not merely the same prune sets).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory for parity.json and parity.md.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report.")
def parity_cmd(left: Path, right: Path, method: str, ratio: float | None, n_prune: int | None,
               require_identical_telemetry: bool, out: Path, as_json: bool) -> None:
    """Compare telemetry stores LEFT and RIGHT; exit 1 when they disagree on what to prune."""
    if (ratio is None) == (n_prune is None):
        raise BadInput("--ratio/--n-prune", "give exactly one of --ratio, --n-prune")
    report = compare(TelemetryStore.open(left), TelemetryStore.open(right), method=method, ratio=ratio,
                     n_prune=n_prune, require_identical_telemetry=require_identical_telemetry)
    prepare_out_dir(out)
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
