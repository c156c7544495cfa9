"""Options several commands share, each declared once here with one help text, and handed to the
command as one validated object: `calibration` (CalibrationOptions), `run` (RunOptions: how the
model runs) and `plan_options` (PlanOptions: how experts are chosen)."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import click

from ..io.files import MANIFEST_HASHES


# every path option: click's own checks ("Path 'x' is not readable." as a usage error, and wrong as
# root) are left to the commands, which say what is wrong with the file in one line
PATH = click.Path(path_type=Path, readable=False)


def _grouped(options: tuple, prefix: str, make: Callable[[dict], object], name: str) -> Callable:
    """A click decorator adding `options` (parameter names starting with `prefix`) and passing them
    on as one keyword argument `name` = make({field: value})."""
    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            values = {k[len(prefix):]: kwargs.pop(k) for k in list(kwargs) if k.startswith(prefix)}
            return command(*args, **{name: make(values)}, **kwargs)

        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper
    return decorate


def _validated(cls):
    def make(values: dict):
        obj = cls(**values)
        obj.validate()
        return obj
    return make


# The option groups of the commands that run a model, built on first use (module __getattr__): their
# choices come from the planning, runner and calibration stages, whose imports (numpy and more) the
# commands without them (apply, verify) would otherwise pay for at start-up.
GROUPS = ("calibration_options", "calibration_options_unchecked", "run_options", "plan_options")


@functools.cache
def _groups() -> dict[str, Callable]:
    from ..planning.criteria import METHODS
    from ..planning.planner import BUDGETS, PlanOptions, parse_layer_spec
    from ..runner.chunks import EXPERT_KERNELS, MODES, RunOptions
    from ..telemetry.calibration import FORMATS, CalibrationOptions

    calibration_flags = (
        click.option("--prompt", "calib_prompt", default=None, help="Calibrate on this one text."),
        click.option("--dataset", "calib_dataset", default=None,
                     help="A `datasets` dataset: hub name (read from the local cache when offline) or a local dataset directory."),
        click.option("--dataset-config", "calib_dataset_config", default=None, help="Configuration name of --dataset."),
        click.option("--dataset-file", "calib_dataset_file", default=None, help="A local json/jsonl/csv/parquet/text file."),
        click.option("--dataset-format", "calib_dataset_format", default="auto", show_default=True,
                     help=f"Format of --dataset-file: {'|'.join(FORMATS)} (auto: from the extension)."),
        click.option("--dataset-text-field", "calib_dataset_text_field", default=None,
                     help="Dotted path to the text in each row (default: text)."),
        click.option("--dataset-messages-field", "calib_dataset_messages_field", default=None,
                     help="Dotted path to chat messages, rendered with the tokenizer's chat template."),
        click.option("--dataset-split", "calib_dataset_split", default="train", show_default=True),
        click.option("--max-samples", "calib_max_samples", type=int, default=None, help="Use at most this many rows."),
        click.option("--min-samples", "calib_min_samples", type=int, default=1, show_default=True,
                     help="Fail when fewer usable rows are available."),
        click.option("--max-tokens", "calib_max_tokens", type=int, default=None, help="Total token budget."),
        click.option("--pack-samples/--no-pack-samples", "calib_pack_samples", default=False, show_default=True,
                     help="Join rows (EOS between) and cut them into full windows of --window-tokens."),
        click.option("--window-tokens", "calib_window_tokens", type=int, default=2048, show_default=True,
                     help="Sequence length: packed window size, or the cut-off of an unpacked row."),
        click.option("--seed", "calib_seed", type=int, default=None,
                     help="Shuffle rows with this seed before selecting (default: source order)."),
    )

    run_flags = (
        click.option("--mode", "run_mode", type=click.Choice(MODES), default="stream", show_default=True,
                     help="stream: layer by layer, one layer in memory; memory: the whole model (parity/speed baseline)."),
        click.option("--chunk-tokens", "run_chunk_tokens", type=int, default=4096, show_default=True,
                     help="Tokens per activation chunk (whole sequences of equal length are batched)."),
        click.option("--sample-batch-size", "run_sample_batch_size", type=int, default=None,
                     help="At most this many sequences per chunk (default: as many as --chunk-tokens holds)."),
        click.option("--work-dir", "run_work_dir", type=PATH, default=None,
                     help="Spilled hidden states and resume state (default: beside --out; eval and compare: a "
                          "temporary directory, removed afterwards)."),
        click.option("--max-memory", "run_max_memory", default=None, metavar="SIZE",
                     callback=lambda ctx, param, value: None if value is None else parse_size(value, "--max-memory"),
                     help="Keep the process's peak memory under SIZE (e.g. 8GB): tokens and experts per chunk are "
                          "chosen to fit; refused up front, with the least that is needed, when nothing fits."),
        click.option("--expert-kernel", "run_expert_kernel", type=click.Choice(EXPERT_KERNELS), default="auto",
                     show_default=True,
                     help="How experts run: loop (one float32 BLAS matmul chain per expert, the CPU's), gather "
                          "(MLX's gather matmuls in the model's dtype, an accelerator's), auto (by device)."),
        click.option("--distributed", "run_distributed", is_flag=True,
                     help="Run as one rank of an mlx.launch group and refuse to run alone (under mlx.launch a "
                          "group of 2 or more is joined anyway); see docs/distributed.md."),
    )

    def _plan_options(values: dict) -> PlanOptions:
        values["skip_layers"] = parse_layer_spec(values["skip_layers"])
        return _validated(PlanOptions)(values)

    plan_flags = (
        click.option("--method", "plan_method", type=click.Choice(METHODS), default="reap", show_default=True,
                     help="Saliency criterion."),
        click.option("--ratio", "plan_ratio", type=float, default=None, help="Fraction of routed experts to prune per layer, in [0, 1)."),
        click.option("--n-prune", "plan_n_prune", type=int, default=None, help="Experts to prune per layer."),
        click.option("--keep", "plan_keep", type=int, default=None, help="Experts to keep per layer."),
        click.option("--min-experts", "plan_min_experts", type=int, default=1, show_default=True,
                     help="Never keep fewer (top_k is always a floor)."),
        click.option("--skip-layers", "plan_skip_layers", default="", help="MoE layers to leave whole, e.g. 0,1,40-47."),
        click.option("--preserve-super-experts/--no-preserve-super-experts", "plan_preserve_super_experts",
                     default=True, show_default=True,
                     help="Never prune experts with outlier max activations (first 75% of layers)."),
        click.option("--budget", "plan_budget", type=click.Choice(BUDGETS), default="uniform", show_default=True,
                     help="uniform: same count per layer; global: one budget over per-layer-normalised scores."),
        click.option("--plan-seed", "plan_seed", type=int, default=0, show_default=True, help="Seed of the random method."),
    )

    calibration_options = _grouped(calibration_flags, "calib_", _validated(CalibrationOptions), "calibration")
    calibration_options.__doc__ = "Where calibration text comes from and how it is shaped: `calibration`."
    # the same options where a calibration source is optional (estimate): validated by the caller
    calibration_options_unchecked = _grouped(calibration_flags, "calib_", lambda values: CalibrationOptions(**values),
                                             "calibration")
    run_options = _grouped(run_flags, "run_", _validated(RunOptions), "run")
    run_options.__doc__ = "How the model is run (mode, chunking, work dir): `run`."
    plan_options = _grouped(plan_flags, "plan_", _plan_options, "plan_options")
    plan_options.__doc__ = "How experts are chosen (criterion, budget, constraints): `plan_options`."
    return {"calibration_options": calibration_options, "calibration_options_unchecked": calibration_options_unchecked,
            "run_options": run_options, "plan_options": plan_options}


def __getattr__(name: str) -> Callable:
    if name in GROUPS:
        return _groups()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, option: str) -> int:
    """"5GB", "500MB", "2GiB" -> bytes; anything else is one line naming the option."""
    import math

    from ..errors import BadInput

    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    try:
        value = float(num) * _UNITS[s[len(num):]]
    except (ValueError, KeyError):
        value = math.nan
    if not math.isfinite(value) or value < 1:
        raise BadInput(option, f"cannot read size {text!r} (a positive size such as 5GB, 500MB, 2GiB)")
    return int(value)


manifest_hash_option = click.option(
    "--manifest-hash", "manifest_hash", type=click.Choice(MANIFEST_HASHES), default=MANIFEST_HASHES[0], show_default=True,
    help="Digest the manifest records of every output file (verify checks either).")

max_shard_option = click.option("--max-shard-size", "max_shard_bytes", default="5GB", show_default=True,
                                callback=lambda ctx, param, value: parse_size(value, "--max-shard-size"),
                                help="Largest output shard (safetensors outputs).")
