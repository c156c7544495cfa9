"""A GGUF model's tokenizer rebuilt from its own metadata with the `tokenizers` library (no torch).

The keys are the ones llama.cpp reads (`tokenizer.ggml.*`): the vocabulary, token types (3 =
control, 4 = user-defined, 6 = byte), merges, scores, special token ids and the add-BOS/EOS flags,
plus `tokenizer.chat_template`. Two vocabulary kinds are built, the ones MoE models ship:

- `gpt2`: byte-level BPE. The text is split by the pre-tokenizer regexes llama.cpp applies for
  `tokenizer.ggml.pre` (gguf_pretokenizers.json, one entry per name llama.cpp knows; each regex
  applied in turn, as llama.cpp does), then mapped to the byte alphabet and merged by rank.
- `llama`: SentencePiece BPE. Merges are derived from the piece scores (a pair merges when the
  joined piece is in the vocabulary; higher score first), unknown bytes fall back to `<0xNN>`
  tokens, and a space is prepended when `tokenizer.ggml.add_space_prefix` is not false.

Other kinds (WordPiece, Unigram, RWKV, ...) are refused with one line.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from ..errors import BadInput
from ..io.gguf import GGUFFile, VType, kv_array

CONTROL, USER_DEFINED = 3, 4
_PRETOKENIZERS = Path(__file__).with_name("gguf_pretokenizers.json")


@lru_cache(maxsize=1)
def pretokenizers() -> dict:
    """llama.cpp's pre-tokenizer name -> {"regex": [...], "ignore_merges": bool}."""
    return json.loads(_PRETOKENIZERS.read_text(encoding="utf-8"))


class _Meta:
    """Typed access to the tokenizer keys of a GGUF's first part; every fault names the file."""

    def __init__(self, g: GGUFFile):
        self.g = g

    def array(self, key: str, required: bool = True) -> list | None:
        kv = self.g.kvs.get(key)
        if kv is None:
            if required:
                raise BadInput(self.g.path, f"metadata {key!r} is missing: the GGUF carries no tokenizer "
                                            f"(collect and eval need one)")
            return None
        return kv_array(kv, self.g.path)

    def scalar(self, key: str, kinds: tuple, default=None):
        kv = self.g.kvs.get(key)
        if kv is None:
            return default
        if kv.vtype == VType.ARRAY or not isinstance(kv.value, kinds) or (kinds == (int,) and isinstance(kv.value, bool)):
            raise BadInput(self.g.path, f"metadata {key!r} has the wrong type ({kv.vtype.name})")
        return kv.value


def _tokens(m: _Meta) -> tuple[list[str], list[int]]:
    tokens = m.array("tokenizer.ggml.tokens")
    types = m.array("tokenizer.ggml.token_type", required=False) or [1] * len(tokens)
    if not tokens or not all(isinstance(t, str) for t in tokens):
        raise BadInput(m.g.path, "metadata 'tokenizer.ggml.tokens' must be a non-empty array of strings")
    if len(types) != len(tokens):
        raise BadInput(m.g.path, f"metadata 'tokenizer.ggml.token_type' has {len(types)} entries for "
                                 f"{len(tokens)} tokens")
    return tokens, types


def _special_id(m: _Meta, name: str, n: int) -> int | None:
    key = f"tokenizer.ggml.{name}_token_id"
    tid = m.scalar(key, (int,))
    if tid is not None and not 0 <= tid < n:
        raise BadInput(m.g.path, f"metadata {key!r} is {tid}, outside the {n}-token vocabulary")
    return tid


def _bpe(m: _Meta, tokens: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = m.scalar("tokenizer.ggml.pre", (str,), "default")
    table = pretokenizers()
    if pre not in table:
        raise BadInput(m.g.path, f"tokenizer.ggml.pre {pre!r} is not a pre-tokenizer llama.cpp knows "
                                 f"({len(table)} known)")
    spec = table[pre]
    merges = [tuple(s.split(" ", 1)) for s in (m.array("tokenizer.ggml.merges", required=False) or [])]
    if any(len(p) != 2 for p in merges):
        raise BadInput(m.g.path, "metadata 'tokenizer.ggml.merges' holds an entry without a space")
    vocab = {t: i for i, t in enumerate(tokens)}
    stray = next((i for i, (a, b) in enumerate(merges) if a not in vocab or b not in vocab), None)
    if stray is not None:  # the native BPE builder would raise a bare Exception
        raise BadInput(m.g.path, f"metadata 'tokenizer.ggml.merges' entry {stray} ({' '.join(merges[stray])!r:.60}) "
                                 f"names a token not in tokenizer.ggml.tokens")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=bool(spec.get("ignore_merges"))))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in spec["regex"]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm(m: _Meta, tokens: list[str], types: list[int]):
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = m.array("tokenizer.ggml.scores", required=False) or [0.0] * len(tokens)
    if len(scores) != len(tokens):
        raise BadInput(m.g.path, f"metadata 'tokenizer.ggml.scores' has {len(scores)} entries for {len(tokens)} tokens")
    vocab = {t: i for i, t in enumerate(tokens)}
    mergeable = [i for i, ty in enumerate(types) if ty not in (CONTROL, USER_DEFINED, 6)]
    pairs = []
    for i in mergeable:
        piece = tokens[i]
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                pairs.append((-scores[i], vocab[left], vocab[right], left, right))
    pairs.sort()
    unk = _special_id(m, "unknown", len(tokens))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in pairs], byte_fallback=True,
                               unk_token=None if unk is None else tokens[unk], fuse_unk=True))
    steps = [normalizers.Replace(" ", "\u2581")]
    if m.scalar("tokenizer.ggml.add_space_prefix", (bool,), True):
        steps.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


def gguf_tokenizer(g: GGUFFile):
    """The tokenizer of a GGUF (its first part), as a transformers fast tokenizer built in memory."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    m = _Meta(g)
    kind = m.scalar("tokenizer.ggml.model", (str,))
    if kind is None:
        raise BadInput(g.path, "metadata 'tokenizer.ggml.model' is missing: the GGUF carries no tokenizer "
                               "(collect and eval need one)")
    if kind not in ("gpt2", "llama"):
        raise BadInput(g.path, f"tokenizer.ggml.model {kind!r} is not supported (byte-level BPE 'gpt2' and "
                               f"SentencePiece 'llama' vocabularies are)")
    tokens, types = _tokens(m)
    try:
        tok = _bpe(m, tokens) if kind == "gpt2" else _spm(m, tokens, types)
    except BadInput:
        raise
    except Exception as e:  # the tokenizers library (native) refusing metadata our checks let through
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise BadInput(g.path, f"cannot build the tokenizer from its metadata ({first})") from None
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    bos, eos = _special_id(m, "bos", len(tokens)), _special_id(m, "eos", len(tokens))
    add_bos = m.scalar("tokenizer.ggml.add_bos_token", (bool,), kind == "llama") and bos is not None
    add_eos = m.scalar("tokenizer.ggml.add_eos_token", (bool,), False) and eos is not None
    if add_bos or add_eos:
        specials = ([(tokens[bos], bos)] if add_bos else []) + ([(tokens[eos], eos)] if add_eos and eos != bos else [])
        pre, post = (f"{tokens[bos]} " if add_bos else ""), (f" {tokens[eos]}" if add_eos else "")
        tok.post_processor = processors.TemplateProcessing(single=f"{pre}$A{post}", pair=f"{pre}$A{post} $B{post}",
                                                           special_tokens=specials)
    hf_logging.set_verbosity_error()
    template = m.scalar("tokenizer.chat_template", (str,))
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None if bos is None else tokens[bos],
        eos_token=None if eos is None else tokens[eos], chat_template=template)
    wrapped.name_or_path = str(g.path)
    return wrapped
