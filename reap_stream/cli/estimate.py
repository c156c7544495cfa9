"""`reap-stream estimate`: memory, disk and time of a prune, before anything runs."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..telemetry.calibration import CalibrationOptions
from .options import calibration_options_unchecked, parse_size


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


@click.command("estimate")
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@calibration_options_unchecked
@click.option("--ratio", type=float, default=None, help="Size the output at this pruning ratio.")
@click.option("--max-memory", "max_memory", default=None, metavar="SIZE",
              callback=lambda ctx, param, value: None if value is None else parse_size(value, "--max-memory"),
              help="The chunking collect would choose to stay under SIZE, or the least it needs.")
@click.option("--quantize", "bits", type=click.Choice(["4", "8"]), default=None,
              help="Estimate the model as quantised to 4 or 8 bits by mlx_lm convert -q (from its config).")
@click.option("--no-calibrate", "no_calibrate", is_flag=True, help="Skip measuring this machine's disk and BLAS.")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON on stdout.")
def estimate_cmd(model_path: Path, calibration: CalibrationOptions, ratio: float | None, max_memory: int | None,
                 bits: str | None, no_calibrate: bool, as_json: bool) -> None:
    """Peak memory, disk and time of collect -> plan -> apply on MODEL, from its config.json and
    safetensors headers (or a bare config.json), without reading any weight."""
    from ..blas import ensure_blas

    ensure_blas()  # before the first `import mlx` (the time bound measures the BLAS)
    from ..errors import BadInput
    from ..estimate import calibration_tokens, estimate

    if ratio is not None and not 0.0 <= ratio < 1.0:
        raise BadInput("--ratio", f"{ratio} is outside [0, 1)")
    tokens = calibration_tokens(model_path, calibration)
    result = estimate(model_path, tokens, ratio=ratio, max_memory=max_memory, bits=None if bits is None else int(bits),
                      calibrate=not no_calibrate)
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
        return
    m, mem, disk = result["model"], result["memory"], result["disk"]
    lines = [f"{m['model_type']}: {m['layers']} layers ({m['moe_layers']} MoE), {m['experts']} experts of width "
             f"{m['expert_width']}, top-{m['top_k']}; {_gb(m['total_bytes'])} ({m['from']})",
             f"experts per layer: {_gb(m['expert_bytes_per_layer'])}; the rest of a layer: {_gb(m['other_bytes_per_layer'])}",
             f"collect on {result['calibration']['tokens']} tokens: peak {_gb(mem['whole_layer_peak_bytes'])} with "
             + (f"whole layers, {_gb(mem['chunked_peak_bytes'])} with experts in chunks" if mem["experts_by_range"]
                else "whole layers (this family's experts are read a whole layer at a time)")]
    limit = mem.get("max_memory")
    if limit:
        lines.append(f"--max-memory {_gb(limit['limit_bytes'])}: " + (
            f"{limit['chunk_tokens']} tokens and "
            f"{_gb(limit['expert_chunk_bytes']) if limit['expert_chunk_bytes'] else 'a whole layer'} of experts per chunk, "
            f"peak {_gb(limit['peak_bytes'])}" if limit["fits"] else limit["why"]))
    lines.append(f"disk: spill {_gb(disk['spill_bytes'])}, telemetry {_gb(disk['telemetry_bytes'])}"
                 + (f", output at ratio {disk['ratio']}: {_gb(disk['output_bytes'])}" if "output_bytes" in disk else ""))
    if "time" in result:
        t = result["time"]
        lines.append(f"time: at least {t['bound_s']} s (disk {t['read_bytes_per_s'] / 1e6:.0f} MB/s, "
                     f"BLAS {t['gemm_flops_per_s'] / 1e9:.0f} GFLOP/s)")
    click.echo("\n".join(lines))
