"""`reap-stream apply`: write a pruned checkpoint (safetensors directory or GGUF file)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import click

from ..errors import BadInput
from ..planning.plan import Plan

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, option: str = "--max-shard-size") -> int:
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    try:
        value = float(num) * _UNITS[s[len(num):]]
    except (ValueError, KeyError):
        value = math.nan
    if not math.isfinite(value) or value < 1:
        raise BadInput(option, f"cannot read size {text!r} (a positive size such as 5GB, 500MB, 2GiB)")
    return int(value)


@click.command("apply")
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.argument("plan_path", metavar="PLAN", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Output directory (or .gguf file).")
@click.option("--dry-run", is_flag=True, help="Validate and print the output layout; write nothing.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--ignore-fingerprint", is_flag=True, help="Apply a plan made for another copy of the same structure.")
@click.option("--buffer-size", default="8MiB", show_default=True, help="Copy buffer (bounds memory).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def apply_cmd(model: Path, plan_path: Path, out: Path, dry_run: bool, max_shard_size: str, overwrite: bool,
              ignore_fingerprint: bool, buffer_size: str, as_json: bool, quiet: bool) -> None:
    """Apply PLAN to MODEL (a safetensors model directory or a GGUF file) and write OUT."""
    plan = Plan.load(plan_path)
    buffer_bytes = parse_size(buffer_size, "--buffer-size")
    from ..io.safetensors import is_gguf

    if is_gguf(model):
        from ..surgery.gguf import apply_gguf
        summary = apply_gguf(model, plan, out, overwrite=overwrite, dry_run=dry_run, buffer_bytes=buffer_bytes,
                             plan_where=str(plan_path), progress=not quiet and not as_json)
    elif model.is_file() and model.suffix == ".gguf":
        raise BadInput(model, "not a GGUF file (bad magic)")
    else:
        summary = _apply_safetensors(model, plan, plan_path, out, dry_run=dry_run, overwrite=overwrite,
                                     max_shard=parse_size(max_shard_size), ignore_fingerprint=ignore_fingerprint,
                                     buffer_bytes=buffer_bytes, progress=not quiet and not as_json)
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
    else:
        _print_summary(summary)


def _apply_safetensors(model: Path, plan: Plan, plan_path: Path, out: Path, *, dry_run: bool, overwrite: bool,
                       max_shard: int, ignore_fingerprint: bool, buffer_bytes: int, progress: bool) -> dict:
    from ..surgery.safetensors import check_output_path, plan_layout, write_layout
    from ..io.safetensors import Checkpoint

    ckpt = Checkpoint.open(model)
    layout = plan_layout(ckpt, plan, max_shard_bytes=max_shard, plan_where=str(plan_path),
                         ignore_fingerprint=ignore_fingerprint)
    check_output_path(model, out, overwrite)
    summary = {"dry_run": dry_run, "out": str(out), **layout.summary()}
    if not dry_run:
        files = write_layout(layout, out, overwrite=overwrite, buffer_bytes=buffer_bytes, progress=progress)
        summary["files"] = files
    return summary


def _print_summary(s: dict) -> None:
    verb = "would write" if s.get("dry_run") else "wrote"
    counts = sorted(set(s.get("kept_per_layer", {}).values()))
    kept = str(counts[0]) if len(counts) == 1 else f"{counts[0]}..{counts[-1]} (non-uniform)"
    if "tensor_bytes" in s:
        ratio = s["tensor_bytes"] / max(1, s["source_tensor_bytes"])
        click.echo(f"{verb} {s['out']}: {len(s['shards'])} shard(s), {s['tensor_bytes']:,} tensor bytes "
                   f"({ratio:.1%} of source), experts kept per pruned layer: {kept}")
        for sh in s["shards"]:
            click.echo(f"  {sh['name']}: {sh['tensors']} tensors, {sh['bytes']:,} bytes")
    else:
        click.echo(f"{verb} {', '.join(s['out'])}: {s['arch']} ({s['layout']}), "
                   f"experts {s['experts_before']} -> {s['experts_after']}, kept per pruned layer: {kept}")
