"""File-system helpers shared by the writers and the stores: atomic text writes and the
attributes of a Zarr v3 group, read without trusting the file."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable

from ..errors import BadInput

_HAS_COPY_FILE_RANGE = hasattr(os, "copy_file_range")


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a hidden temporary beside `path`, then rename: readers see old or new."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def fsync_tree(path: Path) -> None:
    """fsync every file under path, after all of them were written (one journal commit can then
    cover them all, instead of one per file)."""
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def read_store_attrs(path: Path, label: str, fmt: str, version: int) -> dict:
    """The attributes of a reap-stream Zarr v3 store (`label`: what it is, for the messages),
    checked for its format name and schema version."""
    meta = Path(path) / "zarr.json"
    try:
        doc = json.loads(meta.read_text())
    except (FileNotFoundError, NotADirectoryError):
        raise BadInput(path, f"not a {label} store (no zarr.json)") from None
    except OSError as e:
        raise BadInput(meta, f"cannot read: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BadInput(meta, f"invalid JSON: {e}") from None
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    if not isinstance(attrs, dict):
        raise BadInput(meta, "not a Zarr group description (expected a JSON object with an 'attributes' object)")
    if attrs.get("format") != fmt:
        raise BadInput(path, f"not a reap-stream {label} store (format {attrs.get('format')!r})")
    if attrs.get("schema_version") != version:
        raise BadInput(path, f"{label} store schema_version {attrs.get('schema_version')!r} is not supported")
    return attrs


def build_once(final: Path, complete: Callable[[Path], bool], build: Callable[[Path], None]) -> Path:
    """`final`, built by `build(tmp)` in a temporary directory beside it and renamed into place
    unless `complete(final)` already holds. An incomplete leftover is moved aside first; of two
    processes racing, the loser of the rename uses the winner's copy."""
    final = Path(final)
    if complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        trash = final.with_name(f".trash-{final.name}-{uuid.uuid4().hex}")
        with contextlib.suppress(OSError):
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# hashes a manifest may record, the default first: BLAKE3 runs at several GB/s on one core where
# sha256 managed 0.5-1 GB/s here, below the speed of the copy it accompanies (docs/memory.md)
MANIFEST_HASHES = ("blake3", "sha256")


def new_hash(algo: str):
    """A hashlib-like object (update, hexdigest) of one of MANIFEST_HASHES."""
    if algo == "blake3":
        from blake3 import blake3

        return blake3()
    if algo == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown hash {algo!r} (choose {', '.join(MANIFEST_HASHES)})")


def bytes_digest(data: bytes, algo: str) -> str:
    h = new_hash(algo)
    h.update(data)
    return h.hexdigest()


def file_digests(path: Path, algos: tuple[str, ...], bufsize: int = 8 << 20) -> dict[str, str]:
    """{algo: hex digest} of a file, read once in `bufsize` blocks."""
    hashes = {a: new_hash(a) for a in algos}
    buf = bytearray(bufsize)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            for h in hashes.values():
                h.update(view[:n])
    return {a: h.hexdigest() for a, h in hashes.items()}


def file_digest(path: Path, algo: str, bufsize: int = 8 << 20) -> str:
    return file_digests(path, (algo,), bufsize)[algo]


def sha256_file(path: Path, bufsize: int = 8 << 20) -> str:
    return file_digest(path, "sha256", bufsize)


def copy_range(src_fd: int, dst_fd: int, start: int, end: int, buffer: memoryview, path: Path) -> None:
    """Append source bytes [start, end) to dst: in the kernel where it can, else via `buffer`."""
    global _HAS_COPY_FILE_RANGE
    pos = start
    while pos < end:
        n = 0
        if _HAS_COPY_FILE_RANGE:
            try:
                n = os.copy_file_range(src_fd, dst_fd, end - pos, pos)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                _HAS_COPY_FILE_RANGE = False  # e.g. across file systems on older kernels
                continue
        else:
            n = os.preadv(src_fd, [buffer[: min(len(buffer), end - pos)]], pos)
            if n > 0:
                write_all(dst_fd, buffer[:n])
        if n <= 0:
            raise BadInput(path, f"unexpected end of file at byte {pos}")
        pos += n


def write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
