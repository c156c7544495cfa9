"""Reading what users hand us without trusting it: regular files only (a FIFO named config.json
would block forever), sizes bounded before anything is read, JSON nesting bounded before
`json.loads` sees it, every OS error one BadInput naming the file.

Pipes are accepted only where a stream makes sense (calibration text, `--dataset-file <(...)`):
`read_stream` reads them once, within a size limit.
"""
from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import numpy as np

from ..errors import BadInput, os_error

# far above any real document of these kinds (a 400 GB model's index is a few MB), far below
# what would hurt: the limits turn a corrupt or hostile file into one line, not a stall
MAX_JSON_BYTES = 256 << 20
MAX_JSON_DEPTH = 64
MAX_STREAM_BYTES = 16 << 30

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def is_index(text: object) -> bool:
    """A small non-negative decimal written in ASCII digits ("7", not "٧" or "²", nor 5,000 digits)."""
    return isinstance(text, str) and 0 < len(text) <= 9 and text.isascii() and text.isdigit()


def kind_of(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def resolved(path: str | Path) -> Path:
    """`path` made absolute with every link followed (Path.resolve), a link loop as one line."""
    try:
        return Path(path).resolve()
    except RuntimeError:  # Python's word for a symlink loop met while resolving
        raise BadInput(path, "too many levels of symbolic links (a link loop?)") from None
    except OSError as e:
        raise os_error(e, path, doing="cannot resolve") from None


def regular_file(path: str | Path, what: str = "file") -> os.stat_result:
    """stat of `path` (links followed), which must be a regular file; else one line naming it."""
    try:
        st = os.stat(path)
    except (OSError, ValueError) as e:
        raise _stat_error(e, path) from None
    if not stat.S_ISREG(st.st_mode):
        raise BadInput(path, f"{what} is {kind_of(st.st_mode)}, not a regular file")
    return st


def readable_file(path: str | Path, what: str = "file") -> os.stat_result:
    """regular_file, and one byte read from it: a permission or I/O fault is one line before any
    work starts (not a traceback from a library halfway through)."""
    st = regular_file(path, what)
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise os_error(e, path, doing="cannot read") from None
    return st


def _stat_error(e: Exception, path) -> BadInput:
    if isinstance(e, ValueError):  # an embedded NUL byte
        return BadInput(repr(str(path)), "not a usable path (it holds a NUL byte)")
    if isinstance(e, FileNotFoundError):
        return BadInput(path, "not found")
    return os_error(e, path, doing="cannot read")


def read_bytes(path: str | Path, what: str = "file", limit: int = MAX_JSON_BYTES) -> bytes:
    """The whole of a regular file of at most `limit` bytes."""
    st = regular_file(path, what)
    if st.st_size > limit:
        raise BadInput(path, f"{what} is {st.st_size:,} bytes, more than the {limit:,}-byte limit")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise os_error(e, path, doing="cannot read") from None
    if len(data) > limit:
        raise BadInput(path, f"{what} grew past the {limit:,}-byte limit while being read")
    return data


# JSON strings may hold brackets; with them removed, nesting is a running count of brackets
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.S)
_OPEN = np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1
_BLOCK = 1 << 22


def json_depth(raw: bytes) -> int:
    """Deepest bracket nesting of a JSON text (strings ignored), in linear time and bounded memory."""
    stripped = _JSON_STRING.sub(b"", raw) if b'"' in raw else raw
    depth = deepest = 0
    for start in range(0, len(stripped), _BLOCK):
        steps = _OPEN[np.frombuffer(stripped, np.uint8, min(_BLOCK, len(stripped) - start), start)]
        moves = steps[steps != 0]
        if moves.size:
            running = depth + np.cumsum(moves, dtype=np.int64)
            deepest = max(deepest, int(running.max()))
            depth = int(running[-1])
    return deepest


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_json(raw: bytes, where: str | Path, what: str = "JSON", *, max_depth: int = MAX_JSON_DEPTH,
               unique_keys: bool = False):
    """A JSON document from bytes, or one line saying why not (UTF-8 only; nesting bounded)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(where, f"{what} is not UTF-8 (byte {e.start})") from None
    if json_depth(raw) > max_depth:
        raise BadInput(where, f"{what} nests deeper than {max_depth} levels")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates if unique_keys else None)
    except RecursionError:  # unreachable after the depth check; kept as a last guard
        raise BadInput(where, f"{what} nests too deeply") from None
    except ValueError as e:  # JSONDecodeError, duplicate keys, integers past Python's digit limit
        raise BadInput(where, f"invalid {what}: {e}") from None


def read_json(path: str | Path, what: str = "JSON", *, limit: int = MAX_JSON_BYTES, unique_keys: bool = False,
              missing: str | None = None):
    """Parse a regular JSON file; `missing`: the message when it does not exist (else "not found")."""
    if missing is not None and not os.path.lexists(path):
        raise BadInput(path, missing)
    return parse_json(read_bytes(path, what, limit), path, what, unique_keys=unique_keys)


def read_json_object(path: str | Path, what: str = "JSON", **kw) -> dict:
    doc = read_json(path, what, **kw)
    if not isinstance(doc, dict):
        raise BadInput(path, f"{what} is not a JSON object")
    return doc


def read_stream(path: str | Path, what: str = "file", limit: int = MAX_STREAM_BYTES):
    """An open binary file of `path`'s bytes, read once: a regular file as itself, a pipe or device
    (`<(cat rows.jsonl)`) copied into an anonymous temporary file within `limit`, so a format probe
    never consumes what the parser needs."""
    import tempfile

    try:
        f = open(path, "rb")
    except (OSError, ValueError) as e:
        raise _stat_error(e, path) from None
    if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        return f
    copy = tempfile.TemporaryFile()
    try:
        with f:
            while chunk := f.read(1 << 20):
                if copy.tell() + len(chunk) > limit:
                    raise BadInput(path, f"{what} streams more than the {limit:,}-byte limit")
                copy.write(chunk)
    except BaseException as e:
        copy.close()
        if isinstance(e, OSError):
            raise os_error(e, path, doing="cannot read") from None
        raise
    copy.seek(0)
    return copy
