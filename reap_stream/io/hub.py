"""A model named by its Hugging Face hub id (`org/name`), found in the local cache.

Only the cache is read (huggingface_hub's own `snapshot_download(local_files_only=True)`: the
revision `refs/main` points to, under `snapshots/`); nothing is ever downloaded, with or without
HF_HUB_OFFLINE. A local path of the same spelling always wins.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import BadInput

# what the hub accepts as a repository id: namespace/name of letters, digits, - _ .
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}", re.ASCII)


def resolve_model_path(arg: str | Path) -> Path:
    """`arg` itself when it exists (or does not look like a hub id), else the cached snapshot of the
    hub model it names, or one line saying it is not there."""
    path = Path(arg)
    if os.path.lexists(path) or not HUB_ID.fullmatch(str(arg)) or str(arg).endswith(".gguf"):
        return path
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(str(arg), local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError, IncompleteSnapshotError, validation errors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "Cannot find an appropriate cached snapshot" in first:
            first = "no snapshot in the local cache"
        raise BadInput(arg, f"not a local path, and not usable as a Hugging Face hub id from the local cache "
                            f"{constants.HF_HUB_CACHE} ({first[:200]}); download it first, e.g. "
                            f"`hf download {arg}`") from None
