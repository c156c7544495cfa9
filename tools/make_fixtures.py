"""Generate the tiny MoE test checkpoints (every family and variant) into a directory.

    python tools/make_fixtures.py fixtures/generated
    python tools/make_fixtures.py out --family qwen3_moe --variant fp32 --variant q4 --force
"""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from reap_stream.testing import synth


def variants_of(family: str) -> list[str]:
    out = ["fp32", "fp16", "bf16"]
    if family in synth.QUANTIZED_FAMILIES:
        out.append("q4")
    if family in synth.HF_FAMILIES:
        out.append("hf")
    return out


@click.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--family", "families", multiple=True, type=click.Choice(synth.FAMILIES), help="default: all")
@click.option("--variant", "variants", multiple=True, type=click.Choice(synth.VARIANTS), help="default: all that exist")
@click.option("--force", is_flag=True, help="regenerate even if a complete fixture exists")
def main(out_dir: Path, families: tuple[str, ...], variants: tuple[str, ...], force: bool) -> None:
    """Write <OUT_DIR>/<family>-<variant> checkpoints (cached: complete ones are kept)."""
    for family in families or synth.FAMILIES:
        for variant in variants_of(family):
            if variants and variant not in variants:
                continue
            if force:
                shutil.rmtree(out_dir / f"{family}-{variant}", ignore_errors=True)
            path = synth.cached_fixture(family, variant, out_dir)
            size = sum(p.stat().st_size for p in path.iterdir())
            click.echo(f"{path}  {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
