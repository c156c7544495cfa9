"""Rows of calibration text from one source, each tokenised: a prompt, a `datasets` dataset, or a
local json / jsonl / csv / parquet / text file; plain-text fields or chat messages."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from ..errors import BadInput

if TYPE_CHECKING:
    from .calibration import CalibrationOptions

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


def _load_file(opts: "CalibrationOptions"):
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


def _load_hub(opts: "CalibrationOptions"):
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


def encoded_rows(opts: "CalibrationOptions", tokenizer, stats: dict) -> Iterator[list[int]]:
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
