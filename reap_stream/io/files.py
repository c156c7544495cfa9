"""File-system helpers shared by the writers and the stores: atomic text writes and the
attributes of a Zarr v3 group, read without trusting the file."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Callable, Collection, Iterator

from ..errors import BadInput, free_bytes, os_error

_HAS_COPY_FILE_RANGE = hasattr(os, "copy_file_range")


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a hidden temporary beside `path` (a name of its own: two writers never share
    one), then rename: readers see old or new, never a mix. A failure removes the temporary."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise os_error(e, path, doing="cannot write") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step where the kernel can (Linux renameat2 RENAME_EXCHANGE,
    macOS renamex_np RENAME_SWAP); False where it cannot (then nothing happened)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        done = libc.renameat2(-100, bytes(a), -100, bytes(b), 2)  # AT_FDCWD, RENAME_EXCHANGE
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        done = libc.renamex_np(bytes(a), bytes(b), 2)  # RENAME_SWAP
    else:
        return False
    if done == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the complete directory `tmp` at `out`. An existing `out` is swapped out atomically
    (readers see the old output or the new, never neither) and then removed. Where the file system
    cannot swap, the old output is first renamed to `.OUT.reap-old`, which `recover_dir` puts back
    if the process dies before the new one is in place."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    if _exchange(Path(tmp), Path(out)):
        shutil.rmtree(tmp)  # now the old output
        return
    old = out.parent / f".{out.name}.reap-old"
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old)


def recover_dir(out: Path) -> None:
    """After a run killed between the two renames of `replace_dir`'s fallback: the old output back
    in place (or, when the new one made it, the old copy removed)."""
    old = out.parent / f".{out.name}.reap-old"
    if os.path.lexists(old):
        if os.path.lexists(out):
            shutil.rmtree(old)
        else:
            os.rename(old, out)


def check_space(path: Path, needed: int, what: str) -> None:
    """Refuse before the first byte when the file system holding `path` has less than `needed`
    bytes free (a disk that fills during the run is still one line: os_error)."""
    free = free_bytes(path)
    if free is not None and needed > free:
        raise BadInput(path, f"not enough space for the {what}: {needed:,} bytes needed, {free:,} free")


def fsync_tree(path: Path, synced: Collection[str] = ()) -> None:
    """fsync every file under path (but those named in `synced`, already on disk), after all of
    them were written (one journal commit can then cover them all, instead of one per file)."""
    for p in sorted(Path(path).rglob("*")):
        if p.is_file() and p.name not in synced:
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def read_store_attrs(path: Path, label: str, fmt: str, version: int) -> dict:
    """The attributes of a reap-stream Zarr v3 store (`label`: what it is, for the messages),
    checked for its format name and schema version."""
    from .reading import read_json

    meta = Path(path) / "zarr.json"
    if not os.path.lexists(meta):
        raise BadInput(path, f"not a {label} store (no zarr.json)")
    doc = read_json(meta, "JSON")
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


def check_manifest_hash(algo: str) -> None:
    if algo not in MANIFEST_HASHES:
        raise BadInput("--manifest-hash", f"unknown hash {algo!r} (choose {', '.join(MANIFEST_HASHES)})")


def hash_ranges(h, fd: int, ranges, buffer: memoryview, path: Path) -> None:
    """Feed bytes [start, end) of each range of `fd` into `h` (hashlib-like), `buffer` at a time;
    short reads retried, the end of the file one line naming `path`."""
    for start, end in ranges:
        pos = start
        while pos < end:
            n = os.preadv(fd, [buffer[: min(len(buffer), end - pos)]], pos)
            if n <= 0:
                raise BadInput(path, f"unexpected end of file at byte {pos}")
            h.update(buffer[:n])
            pos += n


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


# writes this far apart ask for write-back of the file so far (Flusher.written)
FLUSH_STEP = 64 << 20
_DATASYNC = getattr(os, "fdatasync", os.fsync)  # macOS has fsync only


class Flusher:
    """Owns the descriptor of one file being written and puts it on disk from a helper thread, so
    that durability overlaps the copy instead of following it: `written(n)` after each piece
    (every FLUSH_STEP bytes it asks the helper for an fdatasync of the file so far, requests
    coalesced while one runs), `finish()` hands over the final fsync and the close, `wait()` joins
    and re-raises the helper's error. The pages a copy leaves dirty are then mostly on disk when it
    ends, and one file's last fsync runs while the next file is copied."""

    def __init__(self, fd: int):
        self.fd = fd
        self._since = 0
        self._cond = threading.Condition()
        self._wanted = False
        self._end: bool | None = None  # None: still writing; True: fsync and close; False: close only
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="flusher", daemon=True)
        self._thread.start()

    def written(self, nbytes: int) -> None:
        self._since += nbytes
        if self._since >= FLUSH_STEP:
            self._since = 0
            self._tell(wanted=True)

    def finish(self, sync: bool = True) -> None:
        """No more writes: fsync (unless `sync` is False: the file is being abandoned) and close."""
        self._tell(end=sync)

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error

    def _tell(self, wanted: bool = False, end: bool | None = None) -> None:
        with self._cond:
            self._wanted |= wanted
            if end is not None and self._end is not False:
                self._end = end
            self._cond.notify()

    def _run(self) -> None:
        # the descriptor is closed here and only at the end: the writer may still be using it
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._wanted or self._end is not None)
                    end, self._wanted = self._end, False
                if end is not None:
                    break
                if self._error is None:
                    try:
                        _DATASYNC(self.fd)
                    except OSError as e:  # kept for wait(); the copy goes on and fails or not by itself
                        self._error = e
            if end and self._error is None:
                os.fsync(self.fd)
        except BaseException as e:
            self._error = e
        finally:
            os.close(self.fd)


def copy_flushed(src_fd: int, flusher: Flusher, start: int, end: int, buffer: memoryview, path,
                 done: Callable[[int], object] = lambda n: None) -> None:
    """copy_range of [start, end) into the file `flusher` holds, in FLUSH_STEP pieces that it puts
    on disk behind the copy; `done(n)` after each piece (a progress bar's update)."""
    for piece in range(start, end, FLUSH_STEP):
        stop = min(end, piece + FLUSH_STEP)
        copy_range(src_fd, flusher.fd, piece, stop, buffer, path)
        flusher.written(stop - piece)
        done(stop - piece)


@contextlib.contextmanager
def flushed_writes() -> Iterator[Callable[[Path], Flusher]]:
    """Yields `create(path)`: a new file, truncated, behind its own Flusher (the caller finishes
    it once written, so its last fsync overlaps the next file's copy). On leaving, every file is
    on disk (a helper's error re-raised); if the body fails, they are closed unsynced and the
    body's error is the one raised."""
    flushing: list[Flusher] = []

    def create(path: Path) -> Flusher:
        flushing.append(Flusher(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)))
        return flushing[-1]

    try:
        yield create
        for flusher in flushing:
            flusher.wait()
    except BaseException:
        for flusher in flushing:
            flusher.finish(sync=False)
            with contextlib.suppress(Exception):   # the error being raised is the one to report
                flusher.wait()
        raise
