"""The one error type for bad input: the CLI turns it into exit code 2 and one line."""
from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

# what cannot appear raw in a one-line message: control characters (a newline would split it),
# lone surrogates (they cannot be encoded on the way to a terminal)
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029]")


class BadInput(Exception):
    """Input the tool refuses: `where` names the file (or option), `what` the fault."""

    def __init__(self, where: str | Path, what: str):
        self.where = str(where)
        self.what = what
        super().__init__(f"{self.where}: {what}")


def one_line(text: str) -> str:
    """`text` as a single printable line: control characters and lone surrogates escaped."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape", "backslashreplace").decode("ascii"), text)


def free_bytes(path: str | Path) -> int | None:
    """Bytes free to an unprivileged writer on the file system holding `path` (or its nearest
    existing ancestor); None where that cannot be told."""
    p = Path(os.path.abspath(path))
    for candidate in (p, *p.parents):
        try:
            return shutil.disk_usage(candidate).free
        except (OSError, ValueError):
            continue
    return None


_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENAMETOOLONG: "file name too long",
    errno.ELOOP: "too many levels of symbolic links (a link loop?)",
    errno.EISDIR: "is a directory",
    errno.ENOTDIR: "a component of the path is not a directory",
    errno.ENOENT: "no such file or directory",
    errno.EEXIST: "already exists",
    errno.EIO: "input/output error (a failing disk?)",
}


def os_error(e: OSError, where: str | Path | None = None, *, needed: int | None = None,
             doing: str = "") -> BadInput:
    """An OSError as one line naming `where` (default: the file the error names): what failed
    (`doing`: "cannot write", ...) and why. A full disk says how many bytes were `needed` and how
    many are free."""
    path = where if where is not None else e.filename
    if isinstance(path, bytes):
        path = path.decode("utf-8", "backslashreplace")
    reason = _REASONS.get(e.errno, e.strerror or type(e).__name__)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(path if path is not None else ".")
        parts = [f"{needed:,} bytes needed" if needed is not None else None,
                 f"{free:,} free" if free is not None else None]
        detail = ", ".join(p for p in parts if p)
        reason += f" ({detail})" if detail else ""
    if e.filename2 is not None and where is None:
        reason += f" (renaming to {e.filename2})"
    return BadInput(path if path is not None else "file system", f"{doing}: {reason}" if doing else reason)
