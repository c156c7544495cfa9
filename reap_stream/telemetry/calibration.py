"""Calibration input: texts from one source, tokenised and shaped into token-id sequences.

Sources (exactly one per run): a prompt, a `datasets` dataset (hub name from the local cache, or a
local dataset directory), or a local file (json, jsonl, csv, parquet, text). Rows give either plain
text (a dotted field path) or chat messages rendered through the tokenizer's chat template.

Special tokens, explicitly:
- plain text is encoded with the tokenizer's own default (`add_special_tokens=True`): a BOS where
  the model's tokenizer adds one (Llama, Mixtral), none where it does not (Qwen);
- chat rows are rendered with the chat template (which writes its own BOS/role markers) and
  encoded with `add_special_tokens=False`, so no BOS is doubled;
- when packing, an EOS id follows every sample so windows keep document boundaries.

The token ids are kept in the work dir as a Zarr v3 group (`save_tokens` / `load_tokens`).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import click
import numpy as np

from ..errors import BadInput
from ..io.files import read_store_attrs

CALIBRATION_FORMAT = "reap-stream-calibration"
CALIBRATION_SCHEMA_VERSION = 1
FORMATS = ("auto", "json", "jsonl", "csv", "parquet", "text")
_EXTENSION_FORMAT = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv",
                     ".parquet": "parquet", ".txt": "text", ".text": "text", ".md": "text"}
# our format name -> datasets' packaged builder (json reads both JSON arrays and JSON lines)
_BUILDER = {"json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet", "text": "text"}
# text files: one sample per blank-line-separated paragraph
_TEXT_SAMPLE_BY = "paragraph"
# ShareGPT-style messages ({"from": "human", "value": ...}) -> chat-template roles
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "tool": "tool"}
_SOURCE_OPTIONS = ("--prompt", "--dataset", "--dataset-file")


@dataclass(frozen=True)
class CalibrationOptions:
    """Where calibration text comes from and how it becomes token ids (see `calibration_options`)."""

    prompt: str | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    dataset_file: str | None = None
    dataset_format: str = "auto"
    dataset_text_field: str | None = None  # None: "text"
    dataset_messages_field: str | None = None
    dataset_split: str = "train"
    max_samples: int | None = None
    min_samples: int = 1
    max_tokens: int | None = None
    pack_samples: bool = False
    window_tokens: int = 2048
    sample_batch_size: int | None = None  # None: as many sequences per forward chunk as --chunk-tokens holds
    seed: int | None = None  # None: rows in source order; an int: a seeded shuffle first

    def validate(self) -> None:
        given = [name for name, value in zip(_SOURCE_OPTIONS, (self.prompt, self.dataset, self.dataset_file))
                 if value is not None]
        if len(given) != 1:
            got = f"got {', '.join(given)}" if given else "got none"
            raise BadInput("/".join(_SOURCE_OPTIONS), f"give exactly one calibration source ({got})")
        if self.dataset_format not in FORMATS:
            raise BadInput("--dataset-format", f"unknown format {self.dataset_format!r} (choose {', '.join(FORMATS)})")
        if self.dataset_text_field is not None and self.dataset_messages_field is not None:
            raise BadInput("--dataset-text-field/--dataset-messages-field", "give at most one of them")
        if self.prompt is not None and self.prompt.strip() == "":
            raise BadInput("--prompt", "the prompt is empty")
        for name, value, low in (("--max-samples", self.max_samples, 1), ("--min-samples", self.min_samples, 0),
                                 ("--max-tokens", self.max_tokens, 1), ("--window-tokens", self.window_tokens, 1),
                                 ("--sample-batch-size", self.sample_batch_size, 1)):
            if value is not None and value < low:
                raise BadInput(name, f"must be at least {low} (got {value})")
        if self.max_samples is not None and self.max_samples < self.min_samples:
            raise BadInput("--min-samples", f"{self.min_samples} exceeds --max-samples {self.max_samples}")

    @property
    def where(self) -> str:
        """The source named in messages about the text itself (too few rows, nothing to predict)."""
        return self.dataset_file or self.dataset or "--prompt"

    def shaping(self) -> dict:
        """The options that decide which token ids come out (part of the fingerprint)."""
        return {"text_field": self.dataset_text_field, "messages_field": self.dataset_messages_field,
                "split": self.dataset_split, "config": self.dataset_config, "max_samples": self.max_samples,
                "max_tokens": self.max_tokens, "pack_samples": self.pack_samples,
                "window_tokens": self.window_tokens, "seed": self.seed}


@dataclass
class CalibrationSet:
    """Token-id sequences ready for collect: np.int32 arrays, all `window_tokens` long when packed."""

    sequences: list[np.ndarray]
    fingerprint: str
    source: dict
    packed: bool
    window_tokens: int
    batch_size: int | None = None  # at most this many sequences per forward chunk (None: no limit)
    shaping: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def summary(self) -> dict:
        """JSON-able description for telemetry attributes and `--json` output."""
        return {"fingerprint": self.fingerprint, "num_tokens": self.num_tokens,
                "num_sequences": len(self.sequences), "packed": self.packed,
                "window_tokens": self.window_tokens, "source": self.source}


def token_fingerprint(sequences: list[np.ndarray], shaping: dict) -> str:
    """sha256 over the shaping options (canonical JSON) and every sequence's length and ids."""
    h = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode())
    for seq in sequences:
        h.update(len(seq).to_bytes(8, "little"))
        h.update(np.ascontiguousarray(seq, dtype="<i4").tobytes())
    return "sha256:" + h.hexdigest()


# ---------------------------------------------------------------- rows from a source

def _detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    detected = _EXTENSION_FORMAT.get(path.suffix.lower())
    if detected is None:
        raise BadInput(path, f"cannot tell the format from the extension {path.suffix!r}; "
                             f"pass --dataset-format ({', '.join(FORMATS[1:])})")
    return detected


def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # our BadInput is the one line
    return datasets


def _one_line(e: BaseException) -> str:
    """First line of the innermost cause: datasets wraps parser errors in generic ones."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _load_file(opts: CalibrationOptions):
    path = Path(opts.dataset_file)
    try:
        with open(path, "rb") as f:
            first = f.read(1)
    except OSError as e:
        raise BadInput(path, f"cannot read: {e.strerror or e}") from None
    if not first:
        raise BadInput(path, "dataset is empty (0 bytes)")
    fmt = _detect_format(path, opts.dataset_format)
    datasets = _quiet_datasets()
    kwargs = {"sample_by": _TEXT_SAMPLE_BY} if fmt == "text" else {}
    try:
        ds = datasets.load_dataset(_BUILDER[fmt], data_files=str(path), split="train", **kwargs)
    except Exception as e:  # datasets raises many types for unparsable files
        if "corresponds to no data" in str(e):  # parsed, but no rows at all (e.g. "[]")
            raise BadInput(path, "dataset is empty (0 rows)") from None
        if fmt == "jsonl":
            _raise_bad_json_line(path)
        raise BadInput(path, f"cannot read as {fmt}: {_one_line(e)}") from None
    return ds, path, {"kind": "file", "path": str(path), "format": fmt}


def _raise_bad_json_line(path: Path) -> None:
    """Name the first line of a JSON-lines file that does not parse (only called after a failure)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    raise BadInput(path, f"line {number} is not valid JSON ({e.msg} at column {e.colno})") from None


def _load_hub(opts: CalibrationOptions):
    datasets = _quiet_datasets()
    name = opts.dataset
    try:
        if (Path(name) / "state.json").is_file() or (Path(name) / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(name)  # a dataset saved with save_to_disk
        else:
            loaded = datasets.load_dataset(name, opts.dataset_config)
    except ConnectionError:
        raise BadInput(name, "dataset is not in the local cache and the Hugging Face Hub cannot be reached "
                             "(offline); download it on a connected machine first or pass --dataset-file") from None
    except Exception as e:
        raise BadInput(name, f"cannot load dataset: {_one_line(e)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if opts.dataset_split not in loaded:
            raise BadInput(name, f"no split {opts.dataset_split!r} (splits: {', '.join(loaded)})")
        loaded = loaded[opts.dataset_split]
    return loaded, name, {"kind": "dataset", "name": name, "config": opts.dataset_config,
                          "split": opts.dataset_split}


def _resolve(row: dict, dotted: str, where: object):
    """row["a"]["b"] for "a.b"; integer parts index lists. A missing key is a schema fault."""
    value = row
    for i, part in enumerate(dotted.split(".")):
        if value is None:
            return None
        if isinstance(value, list) and part.lstrip("-").isdigit():
            idx = int(part)
            value = value[idx] if -len(value) <= idx < len(value) else None
        elif isinstance(value, dict):
            if part not in value:
                at = ".".join(dotted.split(".")[:i]) or "rows"
                raise BadInput(where, f"no field {dotted!r} ({at} have fields: {', '.join(sorted(value))})")
            value = value[part]
        else:
            raise BadInput(where, f"field {'.'.join(dotted.split('.')[:i])!r} is a {type(value).__name__}, "
                                  f"cannot look up {part!r} in it")
    return value


def _messages(value, where: object, path: str) -> list[dict] | None:
    if value is None or value == []:
        return None
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise BadInput(where, f"field {path!r} must hold a list of messages, not {type(value).__name__}")
    out = []
    for m in value:
        if "role" in m and "content" in m:
            out.append({"role": m["role"], "content": m["content"]})
        elif "from" in m and "value" in m:
            out.append({"role": _SHAREGPT_ROLES.get(m["from"], m["from"]), "content": m["value"]})
        else:
            raise BadInput(where, f"messages in {path!r} need role/content (or from/value) keys, got {sorted(m)}")
    return out


def _chat_template_of(tokenizer) -> str | None:
    # mlx_lm's TokenizerWrapper forwards `chat_template` to the HF tokenizer and may hold its own
    return getattr(tokenizer, "chat_template", None) or getattr(tokenizer, "_chat_template", None)


def _tokenizer_where(tokenizer) -> str:
    name = getattr(tokenizer, "name_or_path", "") or "tokenizer"
    return str(Path(name) / "tokenizer_config.json") if Path(name).is_dir() else name


def _encoded_rows(opts: CalibrationOptions, tokenizer, stats: dict) -> Iterator[list[int]]:
    """Token ids of each usable row, in selection order. Unusable (empty / null) rows are counted."""
    if opts.prompt is not None:
        stats.update(kind="prompt", rows_total=1)
        yield list(tokenizer.encode(opts.prompt, add_special_tokens=True))
        return
    ds, where, desc = _load_file(opts) if opts.dataset_file is not None else _load_hub(opts)
    stats.update(desc)
    stats["rows_total"] = n = len(ds)
    if n == 0:
        raise BadInput(where, "dataset is empty (0 rows)")
    chat = opts.dataset_messages_field is not None
    path = opts.dataset_messages_field if chat else (opts.dataset_text_field or "text")
    stats["messages_field" if chat else "text_field"] = path
    top = path.split(".")[0]
    if top not in ds.column_names:
        hint = "" if opts.dataset_text_field or chat else "; choose one with --dataset-text-field or --dataset-messages-field"
        raise BadInput(where, f"no field {top!r} in rows (fields: {', '.join(ds.column_names)}){hint}")
    if chat and not _chat_template_of(tokenizer):
        raise BadInput(_tokenizer_where(tokenizer), "tokenizer has no chat template (needed by --dataset-messages-field)")
    order = np.arange(n) if opts.seed is None else np.random.default_rng(opts.seed).permutation(n)
    for idx in order:
        value = _resolve(ds[int(idx)], path, where)
        if chat:
            messages = _messages(value, where, path)
            if messages is None:
                stats["rows_skipped"] += 1
                continue
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            ids = tokenizer.encode(text, add_special_tokens=False)
        else:
            if value is not None and not isinstance(value, str):
                hint = " (chat rows? use --dataset-messages-field)" if isinstance(value, list) else ""
                raise BadInput(where, f"field {path!r} holds {type(value).__name__}, not text{hint}")
            if value is None or not value.strip():
                stats["rows_skipped"] += 1
                continue
            ids = tokenizer.encode(value, add_special_tokens=True)
        yield list(ids)


# ---------------------------------------------------------------- shaping

def build_calibration(opts: CalibrationOptions, tokenizer: Any) -> CalibrationSet:
    """Read, select, tokenise and shape calibration text into token-id sequences.

    `tokenizer` is a transformers tokenizer or mlx_lm's TokenizerWrapper (`encode`,
    `apply_chat_template`, `eos_token_id` are used). Unpacked: one sequence per row, cut to
    `window_tokens`. Packed: rows joined with EOS and cut into full `window_tokens` windows (the
    partial tail is dropped). `max_tokens` caps the total; `max_samples` caps the rows used.
    """
    from tqdm import tqdm

    opts.validate()
    stats: dict = {"rows_skipped": 0}
    eos = getattr(tokenizer, "eos_token_id", None)
    window, budget = opts.window_tokens, opts.max_tokens
    if opts.pack_samples and budget is not None and budget < window:
        raise BadInput("--max-tokens", f"{budget} is less than one packed window of --window-tokens {window}")
    max_windows = None if budget is None else budget // window
    sequences: list[np.ndarray] = []
    stream: list[int] = []
    used = total = 0
    rows = _encoded_rows(opts, tokenizer, stats)
    with tqdm(desc="tokenize", unit="row", disable=None, leave=False) as bar:
        for ids in rows:
            used += 1
            bar.update(1)
            if opts.pack_samples:
                stream += ids + ([eos] if eos is not None else [])
                while len(stream) >= window and (max_windows is None or len(sequences) < max_windows):
                    sequences.append(np.asarray(stream[:window], dtype=np.int32))
                    del stream[:window]
                full = max_windows is not None and len(sequences) >= max_windows
            else:
                room = window if budget is None else min(window, budget - total)
                seq = np.asarray(ids[:room], dtype=np.int32)
                if len(seq):
                    sequences.append(seq)
                    total += len(seq)
                full = budget is not None and total >= budget
            if full or (opts.max_samples is not None and used >= opts.max_samples):
                break
    rows.close()
    where = opts.where
    if used < opts.min_samples:
        limit = f" within --max-tokens {budget}" if budget is not None and used and full else ""
        raise BadInput(where, f"only {used} usable rows{limit}, fewer than --min-samples {opts.min_samples}")
    if not sequences:
        if opts.pack_samples:
            raise BadInput(where, f"only {len(stream)} tokens of text, fewer than one --window-tokens {window} window")
        raise BadInput(where, "no usable rows (every selected row is empty)")
    source = {**stats, "rows_used": used, "special_tokens": {
        "text": "tokenizer default (add_special_tokens=True)",
        "chat": "chat template, add_special_tokens=False",
        "pack_separator_id": eos if opts.pack_samples else None}}
    if opts.pack_samples:
        source["dropped_tail_tokens"] = len(stream)
    shaping = opts.shaping()
    return CalibrationSet(sequences=sequences, fingerprint=token_fingerprint(sequences, shaping),
                          source=source, packed=opts.pack_samples, window_tokens=window,
                          batch_size=opts.sample_batch_size, shaping=shaping)


# ---------------------------------------------------------------- Zarr storage

def save_tokens(calib: CalibrationSet, path: str | Path) -> Path:
    """Write the token ids as a Zarr v3 group (flat `tokens` int32 + `offsets` int64), atomically:
    into a temporary directory, renamed into place when complete."""
    from ..io import zarr as zarr_io

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    flat = np.concatenate(calib.sequences).astype(np.int32)
    offsets = np.zeros(len(calib.sequences) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in calib.sequences], out=offsets[1:])
    # written directly (one raw chunk each, as zarr-python would store it): always read whole
    zarr_io.write_group(tmp, {"format": CALIBRATION_FORMAT, "schema_version": CALIBRATION_SCHEMA_VERSION,
                              **calib.summary(), "batch_size": calib.batch_size, "shaping": calib.shaping})
    zarr_io.write_array(tmp / "tokens", flat)
    zarr_io.write_array(tmp / "offsets", offsets)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def load_tokens(path: str | Path) -> CalibrationSet:
    """Read a group written by `save_tokens`; the ids must still match their fingerprint."""
    import zarr

    path = Path(path)
    attrs = read_store_attrs(path, "calibration token", CALIBRATION_FORMAT, CALIBRATION_SCHEMA_VERSION)
    g = zarr.open_group(str(path), mode="r")
    try:
        flat = np.asarray(g["tokens"][...], dtype=np.int32)
        offsets = np.asarray(g["offsets"][...], dtype=np.int64)
    except (KeyError, OSError, ValueError) as e:
        raise BadInput(path, f"unreadable token arrays: {_one_line(e)}") from None
    if offsets[0] != 0 or offsets[-1] != len(flat) or np.any(np.diff(offsets) < 0):
        raise BadInput(path, "token offsets do not cover the token array")
    sequences = [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    shaping = attrs.get("shaping", {})
    fp = token_fingerprint(sequences, shaping)
    if fp != attrs.get("fingerprint"):
        raise BadInput(path, f"token ids do not match the stored fingerprint ({fp} != {attrs.get('fingerprint')})")
    batch = attrs.get("batch_size")
    if batch is not None and (type(batch) is not int or batch < 1):
        raise BadInput(path, f"batch_size {batch!r} is not a positive integer")
    return CalibrationSet(sequences=sequences, fingerprint=fp, source=attrs.get("source", {}),
                          packed=bool(attrs.get("packed")), window_tokens=int(attrs.get("window_tokens", 0)),
                          batch_size=batch, shaping=shaping)


# ---------------------------------------------------------------- click options

_CLICK_OPTIONS = (
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
    click.option("--sample-batch-size", "calib_sample_batch_size", type=int, default=None,
                 help="At most this many sequences per forward batch (default: as many as --chunk-tokens holds)."),
    click.option("--seed", "calib_seed", type=int, default=None,
                 help="Shuffle rows with this seed before selecting (default: source order)."),
)


def calibration_options(command: Callable) -> Callable:
    """Click decorator: adds the calibration options and passes them on as one
    `calibration: CalibrationOptions` keyword argument (validated)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        values = {name[len("calib_"):]: kwargs.pop(name) for name in list(kwargs) if name.startswith("calib_")}
        opts = CalibrationOptions(**values)
        opts.validate()
        return command(*args, calibration=opts, **kwargs)

    for option in reversed(_CLICK_OPTIONS):
        wrapper = option(wrapper)
    return wrapper
