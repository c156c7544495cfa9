"""A model resolved once, at the command boundary, and passed down to every stage.

`open_model(path)` reads a safetensors model directory (config.json + shard headers) or a GGUF file
(every part of a split), finds its family row, works out its MoE structure (frozen layers included)
and its fingerprint. No tensor byte is read beyond the first router's (for the fingerprint).
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadInput, os_error
from ..io.gguf import GGUFFile, is_gguf, read_model
from ..io.hub import resolve_model_path
from ..io.reading import kind_of
from ..io.safetensors import Checkpoint
from .structure import (MoEStructure, checkpoint_structure, fingerprint, gguf_family, gguf_fingerprint,
                        gguf_structure)
from .table import Family, config_int, family_of


@dataclass
class Model:
    """One model as every stage sees it: its source (safetensors checkpoint or GGUF parts), family
    row, MoE structure and fingerprint (a GGUF's is its own kind: structure.gguf_fingerprint)."""

    path: Path
    family: Family
    structure: MoEStructure
    fingerprint: str | None
    checkpoint: Checkpoint | None = None
    gguf_parts: list[GGUFFile] = field(default_factory=list)
    gguf_arch: str | None = None
    hash_layers: list[int] = field(default_factory=list)   # GGUF layers routed by a fixed table
    _gguf_config: dict | None = field(default=None, repr=False)

    @property
    def is_gguf(self) -> bool:
        return bool(self.gguf_parts)

    @property
    def config(self) -> dict:
        """config.json, or for a GGUF the mlx_lm config rebuilt from its metadata."""
        if self.checkpoint is not None:
            return self.checkpoint.config
        if self._gguf_config is None:
            from .gguf_config import mlx_config

            self.require_runnable("running the model")
            self._gguf_config = mlx_config(self.gguf_parts, self.gguf_arch, self.family, self.structure)
        return self._gguf_config

    @property
    def hidden_size(self) -> int:
        """The width of the hidden states (a wrapper config's text_config holds it)."""
        return config_int(self.config, "hidden_size", self.where, fam=self.family, what="hidden size")

    def require_runnable(self, what: str) -> None:
        """mlx_lm must have a model class for the family (GGUF-only families are apply-only)."""
        if not self.family.mlx:
            name = self.gguf_arch or self.family.model_type
            raise BadInput(self.where, f"{what} needs an mlx_lm model class; {name!r} has none (apply works on it; "
                                       f"collect on another form of the model)")

    @property
    def where(self) -> str:
        """The file messages about the model's configuration name."""
        return str(self.gguf_parts[0].path if self.is_gguf else self.path / "config.json")

    def model_block(self) -> dict:
        """What telemetry stores and plans record of the model: structure and fingerprint."""
        return {**self.structure.to_json(), "fingerprint": self.fingerprint}

    def require_checkpoint(self, what: str) -> Checkpoint:
        """The safetensors form, or one line saying `what` needs it."""
        if self.checkpoint is None:
            raise BadInput(self.path, f"{what} needs a safetensors model directory (MLX or Hugging Face layout); "
                                      f"this is a GGUF file")
        return self.checkpoint


def open_model(path: str | Path) -> Model:
    """Resolve `path` (a model directory, a GGUF file, or the hub id of a model in the local Hugging
    Face cache) into a Model, or raise BadInput."""
    path = resolve_model_path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise BadInput(path, "not found (give a model directory, a .gguf file or a cached hub id org/name)") from None
    except (OSError, ValueError) as e:
        raise os_error(e, path, doing="cannot open") if isinstance(e, OSError) else BadInput(path, str(e)) from None
    if not stat.S_ISDIR(mode) and not stat.S_ISREG(mode):
        raise BadInput(path, f"is {kind_of(mode)}, not a model directory or a GGUF file")
    if stat.S_ISREG(mode) and (path.suffix == ".gguf" or is_gguf(path)):  # read_gguf says why it is not one
        parts = read_model(path)
        arch, fam = gguf_family(parts[0])
        if "reap.layout" in parts[0].kvs:
            raise BadInput(path, f"already recompacted (reap.layout={parts[0].get('reap.layout')!r}); "
                                 f"apply plans to the original file")
        st, hash_layers = gguf_structure(parts, arch, fam)
        return Model(path, fam, st, gguf_fingerprint(parts, arch, st, fam), gguf_parts=parts, gguf_arch=arch,
                     hash_layers=hash_layers)
    ckpt = Checkpoint.open(path)
    fam = family_of(ckpt.config, str(ckpt.root / "config.json"))
    st = checkpoint_structure(ckpt, fam)
    return Model(path, fam, st, fingerprint(ckpt, st, fam), checkpoint=ckpt)
