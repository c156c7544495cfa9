"""Rows of a local calibration file, read by our own code before anything native sees them.

JSON lines, a JSON document (a list of row objects, or an object of equal-length columns), CSV
(a header row, cells as text) and text (one row per blank-line-separated paragraph) are parsed
here, with the nesting and size limits of io/reading; each row must be a JSON object. Parquet is
decoded by pyarrow in a child process (a corrupt file can crash a native reader; the child's
death is then one line) into JSON lines, which are read as above.

A file is read once: a pipe (`--dataset-file <(cat rows.jsonl)`) is first copied into a temporary
file, so probing its format consumes nothing. JSON lines stay on disk (mapped; a row is parsed
again when used), so a large file costs memory only for the rows used.
"""
from __future__ import annotations

import csv
import io
import json
import mmap
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import BadInput
from ..io.reading import MAX_JSON_DEPTH, json_depth, parse_json, read_stream

# JSON documents, CSV and text are decoded whole; beyond this, JSON lines (read row by row) are the way
MAX_IN_MEMORY = 2 << 30
_BOM = b"\xef\xbb\xbf"


class FileRows:
    """What calibration needs of a file's rows: their count, the field names (in order of first
    appearance, as a table would have them), row i as a dict, and how to name row i in messages.

    `schema` holds, for every object-valued field seen in any row, the union of its keys: a key
    another row has is read as None where a row lacks it (as a table's missing cell would be)."""

    def __init__(self, n: int, get: Callable[[int], dict], schema: dict, label: Callable[[int], str]):
        self._n, self._get, self.schema, self.label = n, get, schema, label

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict:
        return self._get(i)

    @property
    def column_names(self) -> list[str]:
        return list(self.schema)


def _merge_schema(schema: dict, row: dict, depth: int = 0) -> None:
    for key, value in row.items():
        sub = schema.setdefault(key, {})
        if isinstance(value, dict) and depth < MAX_JSON_DEPTH:
            _merge_schema(sub, value, depth + 1)


def _object(value: object, where: Path, label: str) -> dict:
    if not isinstance(value, dict):
        shown = "null" if value is None else type(value).__name__
        raise BadInput(where, f"{label} is not a JSON object ({shown}); each row must be an object of fields")
    return value


def _parse_line(raw: bytes, where: Path, number: int):
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and json_depth(raw) > MAX_JSON_DEPTH:
        raise BadInput(where, f"line {number} nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(where, f"line {number} is not UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text)
    except ValueError as e:
        msg = getattr(e, "msg", None)
        detail = f"{msg} at column {e.colno}" if msg else str(e)
        raise BadInput(where, f"line {number} is not valid JSON ({detail})") from None


def _jsonl(f, where: Path) -> FileRows:
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        return FileRows(0, lambda i: {}, {}, str)
    buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    starts, ends, numbers, schema = [], [], [], {}
    pos = len(_BOM) if buf[:3] == _BOM else 0
    number = 0
    while pos < size:
        end = buf.find(b"\n", pos)
        end = size if end < 0 else end
        number += 1
        stop = end - 1 if end > pos and buf[end - 1] == 0x0D else end
        raw = buf[pos:stop]
        if raw.strip():
            _merge_schema(schema, _object(_parse_line(raw, where, number), where, f"line {number}"))
            starts.append(pos)
            ends.append(stop)
            numbers.append(number)
        pos = end + 1
    starts_a, ends_a, numbers_a = (np.asarray(a, np.int64) for a in (starts, ends, numbers))

    def get(i: int) -> dict:
        return _parse_line(buf[starts_a[i]:ends_a[i]], where, int(numbers_a[i]))

    return FileRows(len(starts_a), get, schema, lambda i: f"line {int(numbers_a[i])}")


def _whole(f, where: Path, what: str) -> bytes:
    size = os.fstat(f.fileno()).st_size
    if size > MAX_IN_MEMORY:
        raise BadInput(where, f"{what} of {size:,} bytes is more than the {MAX_IN_MEMORY:,} read whole; "
                              f"use JSON lines (read row by row)")
    return f.read().removeprefix(_BOM)


def _decoded(f, where: Path, what: str) -> str:
    try:
        return _whole(f, where, what).decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(where, f"not UTF-8 (byte {e.start})") from None


def _listed(rows: list[dict]) -> FileRows:
    schema: dict = {}
    for row in rows:
        _merge_schema(schema, row)
    return FileRows(len(rows), rows.__getitem__, schema, lambda i: f"row {i + 1}")


def _json(f, where: Path) -> FileRows:
    doc = parse_json(_whole(f, where, "a JSON document"), where, "JSON")
    if isinstance(doc, dict) and doc and all(isinstance(v, list) for v in doc.values()):
        lengths = {len(v) for v in doc.values()}
        if len(lengths) != 1:
            raise BadInput(where, "columns of the JSON object have different lengths")
        doc = [dict(zip(doc, values)) for values in zip(*doc.values())]
    if isinstance(doc, dict):
        doc = [doc]
    if not isinstance(doc, list):
        raise BadInput(where, f"a JSON document of rows must be a list of objects, not {type(doc).__name__}")
    return _listed([_object(row, where, f"row {i + 1}") for i, row in enumerate(doc)])


def _csv(f, where: Path) -> FileRows:
    text = _decoded(f, where, "a CSV file")
    csv.field_size_limit(max(len(text), 1 << 17))
    try:
        lines = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as e:
        raise BadInput(where, f"not valid CSV: {e}") from None
    if not lines or not lines[0]:
        return FileRows(0, lambda i: {}, {}, str)
    header = lines[0]
    if len(set(header)) != len(header):
        raise BadInput(where, "the CSV header names a column twice")
    rows = []
    for number, cells in enumerate(lines[1:], 2):
        if not cells:
            continue
        if len(cells) > len(header):
            raise BadInput(where, f"line {number} has {len(cells)} fields, the header has {len(header)}")
        # an empty cell is a missing value, as in a table
        rows.append({k: (v if v != "" else None) for k, v in zip(header, cells + [""] * (len(header) - len(cells)))})
    return FileRows(len(rows), rows.__getitem__, dict.fromkeys(header, {}), lambda i: f"row {i + 1}")


def _text(f, where: Path) -> FileRows:
    text = _decoded(f, where, "a text file").replace("\r\n", "\n").replace("\r", "\n")
    rows = [{"text": p} for p in text.split("\n\n") if p]
    return FileRows(len(rows), rows.__getitem__, {"text": {}}, lambda i: f"paragraph {i + 1}")


# pyarrow decodes the file in a child; rows come back as JSON lines (values it cannot write as
# JSON, e.g. timestamps, as text)
_PARQUET_CHILD = """
import json, sys
import pyarrow.parquet as pq
with open(sys.argv[2], "w", encoding="utf-8") as out:
    for batch in pq.ParquetFile(sys.argv[1]).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            out.write(json.dumps(row, default=str) + "\\n")
"""


def _parquet(f, where: Path) -> FileRows:
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as rows_file:
        source = f"/dev/fd/{f.fileno()}"  # the file we hold open (a pipe's copy has no name)
        try:
            done = subprocess.run([sys.executable, "-c", _PARQUET_CHILD, source, rows_file.name],
                                  pass_fds=(f.fileno(),), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  errors="replace")
        except OSError as e:
            raise BadInput(where, f"cannot start the parquet reader: {e.strerror}") from None
        if done.returncode != 0:
            if done.returncode < 0:
                raise BadInput(where, f"cannot read as parquet: the reader crashed (signal {-done.returncode})")
            last = (done.stderr.strip().splitlines() or ["no message"])[-1][:300]
            raise BadInput(where, f"cannot read as parquet: {last}")
        with open(rows_file.name, "rb") as rows:
            return _jsonl(rows, where)


_READERS = {"jsonl": _jsonl, "json": _json, "csv": _csv, "text": _text, "parquet": _parquet}


def sniff(head: bytes) -> str | None:
    """The format the first bytes of a file show, where they show one."""
    if head.startswith(b"PAR1"):
        return "parquet"
    first = head.removeprefix(_BOM).lstrip()[:1]
    return {b"{": "jsonl", b"[": "json"}.get(first)


def read_rows(path: Path, fmt: str | None, what: Callable[[str | None], str]) -> tuple[FileRows, str]:
    """The rows of `path` in format `fmt` (None: tell it from the first bytes; `what(None)` then
    names the format or raises). Returns (rows, format)."""
    with read_stream(path, "dataset file") as f:
        head = f.read(64)
        if not head:
            raise BadInput(path, "dataset is empty (0 bytes)")
        fmt = fmt or what(sniff(head))
        f.seek(0)
        return _READERS[fmt](f, path), fmt
