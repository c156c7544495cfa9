"""`reap-stream report TELEMETRY [--plan plan.json] --out DIR`: markdown summary plus figures."""
from __future__ import annotations

from pathlib import Path

import click

from ..planning.criteria import METHODS
from ..errors import BadInput
from ..io.lock import exclusive
from ..planning.plan import Plan
from ..telemetry.store import TelemetryStore
from .options import PATH


@click.command("report")
@click.argument("telemetry", type=PATH)
@click.option("--plan", "plan_path", type=PATH, help="Overlay this plan's kept/pruned experts.")
@click.option("--method", type=click.Choice(METHODS), help="Saliency criterion to show (default: the plan's, else reap).")
@click.option("--out", required=True, type=PATH, help="Directory for report.md and PNGs.")
def report_cmd(telemetry: Path, plan_path: Path | None, method: str | None, out: Path) -> None:
    """Summarise TELEMETRY (and a plan made from it) as markdown and PNG figures."""
    store = TelemetryStore.open(telemetry)
    plan = Plan.load(plan_path) if plan_path else None
    if out.exists() and not out.is_dir():
        raise BadInput(out, "output exists and is not a directory")
    from ..planning.report import write_report  # matplotlib loads only when a report is made

    with exclusive(out, "report"):
        written = write_report(store, out, plan=plan, plan_where=str(plan_path) if plan_path else None, method=method)
    click.echo(f"wrote {out}: " + ", ".join(p.name for p in written))
