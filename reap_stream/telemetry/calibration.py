"""Calibration input: texts from one source, tokenised and shaped into token-id sequences.

Sources (exactly one per run, telemetry/sources.py): a prompt, a `datasets` dataset (hub name from
the local cache, or a local dataset directory), or a local file (json, jsonl, csv, parquet, text).
Rows give either plain text (a dotted field path) or chat messages rendered through the
tokenizer's chat template.

Special tokens, explicitly:
- plain text is encoded with the tokenizer's own default (`add_special_tokens=True`): a BOS where
  the model's tokenizer adds one (Llama, Mixtral), none where it does not (Qwen);
- chat rows are rendered with the chat template (which writes its own BOS/role markers) and
  encoded with `add_special_tokens=False`, so no BOS is doubled;
- when packing, an EOS id follows every sample so windows keep document boundaries.

The token ids are kept in the work dir (telemetry/tokens.py).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import BadInput
from .sources import FORMATS, encoded_rows

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
                                 ("--max-tokens", self.max_tokens, 1), ("--window-tokens", self.window_tokens, 1)):
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
    rows = encoded_rows(opts, tokenizer, stats)
    with tqdm(desc="tokenize", unit="row", disable=None, leave=False) as bar:
        for ids in rows:
            used += 1
            bar.update(1)
            if opts.pack_samples:
                stream += ids + ([eos] if eos is not None else [])
                cut = 0  # windows are cut at an index, the list shortened once per row: linear time
                while len(stream) - cut >= window and (max_windows is None or len(sequences) < max_windows):
                    sequences.append(np.asarray(stream[cut:cut + window], dtype=np.int32))
                    cut += window
                del stream[:cut]
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
                          source=source, packed=opts.pack_samples, window_tokens=window, shaping=shaping)
