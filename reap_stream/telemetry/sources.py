"""Rows of calibration text from one source, each tokenised: a prompt, a `datasets` dataset, or a
local json / jsonl / csv / parquet / text file; plain-text fields or chat messages."""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from ..errors import BadInput
from .rows import read_rows

if TYPE_CHECKING:
    from .calibration import CalibrationOptions

FORMATS = ("auto", "json", "jsonl", "csv", "parquet", "text")
_EXTENSION_FORMAT = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv",
                     ".parquet": "parquet", ".txt": "text", ".text": "text", ".md": "text"}
# ShareGPT-style messages ({"from": "human", "value": ...}) -> chat-template roles
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "tool": "tool"}


def _format_of(path: Path, fmt: str) -> Callable[[str | None], str]:
    """The format to read `path` as: the option, else the extension, else what the first bytes
    show (the sniffed format is passed in; None when they show nothing)."""
    def decide(sniffed: str | None) -> str:
        if fmt != "auto":
            return fmt
        detected = _EXTENSION_FORMAT.get(path.suffix.lower()) or sniffed
        if detected is None:
            raise BadInput(path, f"cannot tell the format from the extension {path.suffix!r} or the first bytes; "
                                 f"pass --dataset-format ({', '.join(FORMATS[1:])})")
        return detected
    return decide


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
    rows, fmt = read_rows(path, None, _format_of(path, opts.dataset_format))
    return rows, path, {"kind": "file", "path": str(path), "format": fmt}


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


_INDEX = re.compile(r"-?\d{1,9}", re.ASCII)


def _resolve(row: dict, dotted: str, where: object, schema: dict | None):
    """row["a"]["b"] for "a.b"; integer parts index lists. A key no row has is a schema fault; a key
    other rows have (`schema`, the union of every row's keys) is a missing value, None."""
    value = row
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if value is None:
            return None
        if isinstance(value, list) and _INDEX.fullmatch(part):
            idx = int(part)
            value = value[idx] if -len(value) <= idx < len(value) else None
            schema = None
        elif isinstance(value, dict):
            known = value if schema is None else schema
            if part not in value:
                if part in known:
                    return None
                at = ".".join(parts[:i]) or "rows"
                raise BadInput(where, f"no field {dotted!r} ({at} have fields: {', '.join(sorted(known))})")
            value = value[part]
            schema = None if schema is None else schema.get(part) or None
        else:
            raise BadInput(where, f"field {'.'.join(parts[:i])!r} is a {type(value).__name__}, "
                                  f"cannot look up {part!r} in it")
    return value


def _text(value: object, where: object, label: str, field: str) -> str:
    """`value` if it is text a tokenizer can take (no lone surrogates), else one line saying why."""
    if not isinstance(value, str):
        raise BadInput(where, f"{label}: {field} is {type(value).__name__}, not text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput(where, f"{label}: {field} holds a lone surrogate (not valid Unicode text)") from None
    return value


def _messages(value, where: object, path: str, label: str) -> list[dict] | None:
    if value is None or value == []:
        return None
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise BadInput(where, f"{label}: field {path!r} must hold a list of messages, not {type(value).__name__}")
    out = []
    for n, m in enumerate(value, 1):
        if "role" in m and "content" in m:
            role, content = m["role"], m["content"]
        elif "from" in m and "value" in m:
            role, content = m["from"], m["value"]
            role = _SHAREGPT_ROLES.get(role, role) if isinstance(role, str) else role
        else:
            raise BadInput(where, f"{label}: messages in {path!r} need role/content (or from/value) keys, "
                                  f"got {sorted(map(str, m))}")
        out.append({"role": _text(role, where, label, f"message {n}'s role"),
                    "content": _text(content, where, label, f"message {n}'s content")})
    return out


def _render_chat(tokenizer, messages: list[dict], where: object, label: str) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # the template is the model's own code (jinja): any error means "cannot render"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise BadInput(where, f"{label}: the chat template cannot render these messages ({first})") from None
    return _text(text, where, label, "the rendered chat")


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
    schema = getattr(ds, "schema", None)
    label = getattr(ds, "label", lambda i: f"row {i + 1}")
    order = np.arange(n) if opts.seed is None else np.random.default_rng(opts.seed).permutation(n)
    for idx in order:
        value = _resolve(ds[int(idx)], path, where, schema)
        if chat:
            messages = _messages(value, where, path, label(int(idx)))
            if messages is None:
                stats["rows_skipped"] += 1
                continue
            text = _render_chat(tokenizer, messages, where, label(int(idx)))
            ids = tokenizer.encode(text, add_special_tokens=False)
        else:
            if value is not None and not isinstance(value, str):
                hint = " (chat rows? use --dataset-messages-field)" if isinstance(value, list) else ""
                raise BadInput(where, f"field {path!r} holds {type(value).__name__}, not text{hint}")
            if value is None or not value.strip():
                stats["rows_skipped"] += 1
                continue
            ids = tokenizer.encode(_text(value, where, label(int(idx)), f"field {path!r}"), add_special_tokens=True)
        yield list(ids)
