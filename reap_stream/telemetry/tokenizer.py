"""The model's own tokenizer, loaded offline from its directory (or rebuilt from a GGUF's metadata)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import BadInput
from ..io.reading import readable_file

if TYPE_CHECKING:
    from ..families.model import Model
    from .calibration import CalibrationOptions, CalibrationSet

# files any one of which makes a model directory's tokenizer loadable
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def _check_readable(model_dir: Path) -> None:
    """Every file the tokenizer may read is a regular, readable file: transformers would block on a
    FIFO and answer an unreadable file with a traceback."""
    for path in sorted(model_dir.iterdir()):
        if path.name.startswith(("tokenizer", "special_tokens", "added_tokens", "chat_template", "vocab", "merges")):
            readable_file(path, "tokenizer file")


def load_tokenizer(model_dir: Path):
    """The model's own tokenizer (transformers, offline)."""
    model_dir = Path(model_dir)
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        raise BadInput(model_dir / "tokenizer.json", f"missing tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    _check_readable(model_dir)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # transformers raises many types; all mean "cannot load"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(model_dir / "tokenizer.json", f"cannot load the tokenizer: {first}") from None


def tokenise(model: "Model", options: "CalibrationOptions") -> "CalibrationSet":
    """The calibration text of `options` (CalibrationOptions) as token ids of `model`'s own tokenizer."""
    from .calibration import build_calibration

    if model.is_gguf:
        from .gguf_tokenizer import gguf_tokenizer

        return build_calibration(options, gguf_tokenizer(model.gguf_parts[0]))
    return build_calibration(options, load_tokenizer(model.path))
