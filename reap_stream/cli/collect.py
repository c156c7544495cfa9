"""`reap-stream collect` and `reap-stream merge`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..telemetry.calibration import CalibrationOptions, CalibrationSet, calibration_options
from ..errors import BadInput
from ..runner.stream import MODES, check_chunk_tokens

if TYPE_CHECKING:  # imported inside the commands at run time, like the rest of the model side
    from ..io.safetensors import Checkpoint

# files any one of which makes a model directory's tokenizer loadable
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def load_tokenizer(model_dir: Path):
    """The model's own tokenizer (transformers, offline)."""
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        raise BadInput(model_dir / "tokenizer.json", f"missing tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # transformers raises many types; all mean "cannot load"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(model_dir / "tokenizer.json", f"cannot load the tokenizer: {first}") from None


def open_and_tokenise(model_dir: Path, calibration: CalibrationOptions) -> tuple[Checkpoint, CalibrationSet]:
    """Open and check the model, then tokenise the text with the model's own tokenizer. The open
    checkpoint is returned so that later steps do not parse its headers again."""
    from ..blas import ensure_blas

    ensure_blas()  # before the first `import mlx`
    from ..telemetry.calibration import build_calibration
    from ..io.safetensors import Checkpoint
    from ..families.structure import checkpoint_structure

    ckpt = Checkpoint.open(model_dir)
    checkpoint_structure(ckpt)  # unknown model_type / no MoE: refuse before tokenising
    return ckpt, build_calibration(calibration, load_tokenizer(Path(model_dir)))


@click.command("collect")
@click.argument("model_dir", type=click.Path(path_type=Path))
@calibration_options
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Telemetry store to write (Zarr).")
@click.option("--work-dir", type=click.Path(path_type=Path), default=None,
              help="Hidden-state spill and resume state (default: OUT.work next to OUT).")
@click.option("--mode", type=click.Choice(MODES), default="stream", show_default=True,
              help="stream: layer-major, one layer in memory; memory: whole model (parity/speed baseline).")
@click.option("--layers", "layers_spec", default=None, help="MoE layers to record, e.g. 0-3,8 (default: all).")
@click.option("--renorm-topk/--no-renorm-topk", default=True, show_default=True,
              help="Router weight g = probability divided by the token's top-k sum (the reference's default).")
@click.option("--chunk-tokens", type=int, default=4096, show_default=True,
              help="Tokens per activation chunk (whole sequences of equal length are batched).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def collect_cmd(model_dir: Path, calibration, out: Path, work_dir: Path | None, mode: str,
                layers_spec: str | None, renorm_topk: bool, chunk_tokens: int, as_json: bool) -> None:
    """Collect REAP telemetry of MODEL_DIR on calibration text into --out."""
    from ..blas import blas_info
    from ..telemetry.collect import CollectOptions, collect, parse_layers

    options = CollectOptions(mode=mode, layers=parse_layers(layers_spec), renorm_topk=renorm_topk,
                             chunk_tokens=chunk_tokens)
    check_chunk_tokens(chunk_tokens)
    ckpt, calib = open_and_tokenise(model_dir, calibration)
    summary = collect(ckpt, calib, out, work_dir, options, progress=not as_json)
    summary["blas"] = blas_info()
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))
    else:
        click.echo(f"collected {len(summary['layers'])} MoE layers into {summary['out']}"
                   + (f" ({summary['tokens_per_s']} tokens/s)" if summary.get("tokens_per_s") else ""))


@click.command("merge")
@click.argument("stores", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Merged telemetry store.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def merge_cmd(stores: tuple[Path, ...], out: Path, as_json: bool) -> None:
    """Add telemetry stores of one model collected on disjoint calibration shards."""
    from ..telemetry.collect import merge

    summary = merge(list(stores), out)
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))
    else:
        click.echo(f"merged {len(stores)} stores ({summary['num_tokens']} tokens) into {out}")
