"""`reap-stream apply`: write a pruned checkpoint (safetensors directory or GGUF file)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .options import PATH, manifest_hash_option, max_shard_option, parse_size

if TYPE_CHECKING:
    from ..families.model import Model
    from ..planning.plan import Plan

@click.command("apply")
@click.argument("model", type=PATH)
@click.argument("plan_path", metavar="PLAN", type=PATH)
@click.option("--out", "out", required=True, type=PATH, help="Output directory (or .gguf file).")
@click.option("--dry-run", is_flag=True, help="Validate and print the output layout; write nothing.")
@max_shard_option
@manifest_hash_option
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--ignore-fingerprint", is_flag=True, help="Apply a plan made for another copy of the same structure.")
@click.option("--buffer-size", default="8MiB", show_default=True, help="Copy buffer (bounds memory).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def apply_cmd(model: Path, plan_path: Path, out: Path, dry_run: bool, max_shard_bytes: int, manifest_hash: str,
              overwrite: bool, ignore_fingerprint: bool, buffer_size: str, as_json: bool, quiet: bool) -> None:
    """Apply PLAN to MODEL (a safetensors model directory or a GGUF file) and write OUT."""
    from ..families.model import open_model
    from ..planning.plan import Plan

    plan = Plan.load(plan_path)
    buffer_bytes = parse_size(buffer_size, "--buffer-size")
    resolved = open_model(model)
    if resolved.is_gguf:
        from ..surgery.gguf import apply_gguf
        summary = apply_gguf(resolved, plan, out, overwrite=overwrite, dry_run=dry_run, buffer_bytes=buffer_bytes,
                             plan_where=str(plan_path), progress=not quiet and not as_json,
                             ignore_fingerprint=ignore_fingerprint, manifest_hash=manifest_hash)
    else:
        summary = _apply_safetensors(resolved, plan, plan_path, out, dry_run=dry_run, overwrite=overwrite,
                                     max_shard=max_shard_bytes, ignore_fingerprint=ignore_fingerprint,
                                     buffer_bytes=buffer_bytes, progress=not quiet and not as_json,
                                     manifest_hash=manifest_hash)
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
    else:
        _print_summary(summary)


def _apply_safetensors(model: Model, plan: Plan, plan_path: Path, out: Path, *, dry_run: bool, overwrite: bool,
                       max_shard: int, ignore_fingerprint: bool, buffer_bytes: int, progress: bool,
                       manifest_hash: str) -> dict:
    from ..surgery.safetensors import check_output_path, plan_layout, write_layout

    layout = plan_layout(model, plan, max_shard_bytes=max_shard, plan_where=str(plan_path),
                         ignore_fingerprint=ignore_fingerprint)
    check_output_path(model.path, out, overwrite)
    summary = {"dry_run": dry_run, "out": str(out), **layout.summary()}
    if not dry_run:
        files = write_layout(layout, out, overwrite=overwrite, buffer_bytes=buffer_bytes, progress=progress,
                             manifest_hash=manifest_hash)
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
