"""`reap-stream verify OUT_DIR`: exit 0 when a pruned output is whole and consistent, 1 naming each mismatch."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..surgery.verify import verify_output
from .options import PATH


@click.command("verify")
@click.argument("out_dir", type=PATH)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def verify_cmd(out_dir: Path, as_json: bool, quiet: bool) -> None:
    """Check OUT_DIR's manifest checksums, tensor shapes against config.json, and the plan record
    (or, for a recompacted .gguf file, its manifest checksums, layout and expert counts)."""
    result = verify_output(out_dir, progress=not quiet and not as_json)
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
    elif result["ok"] and result["format"] == "gguf":
        click.echo(f"{out_dir}: OK ({result['files_checked']} GGUF part(s) match the manifest; layout and expert "
                   "counts consistent)")
    elif result["ok"]:
        click.echo(f"{out_dir}: OK ({result['files_checked']} files match the manifest; shapes and plan consistent)")
    else:
        base = out_dir.parent if result["format"] == "gguf" else out_dir
        for f in result["findings"]:
            click.echo(f"{base}/{f['file']}: {f['check']}: {f['what']}", err=True)
    if not result["ok"]:
        sys.exit(1)
