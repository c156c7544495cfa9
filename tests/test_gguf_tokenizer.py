"""Tokenizers rebuilt from GGUF metadata (no torch): SentencePiece vocabularies as llama.cpp's
converter records them give sentencepiece's own ids; every pre-tokenizer llama.cpp names compiles."""
from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import gguf
import numpy as np
import pytest

from reap_stream.io.gguf import read_gguf
from reap_stream.telemetry.gguf_tokenizer import gguf_tokenizer, pretokenizers

spm = pytest.importorskip("sentencepiece")

TEXTS = ["Hello world, parser.add_argument('--x', nargs=2)", "def f(x):\n    return x ** 2  # ünïcödé ✓",
         "numbers 1234567 and <tool> calls", "tabs\tand  double  spaces"]


def spm_gguf(tmp_path: Path) -> tuple[Path, object]:
    """A SentencePiece BPE vocabulary trained here as Llama's and Mistral's are (byte fallback, no
    normalisation, whitespace kept) with one user-defined piece, stored the way llama.cpp's converter
    stores one: pieces, scores, token types, special ids, add-BOS."""
    source = inspect.getsource(argparse)
    prefix = str(tmp_path / "spm")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(source.splitlines()), model_prefix=prefix, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   user_defined_symbols=["<tool>"], normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i)
             else 4 if sp.id_to_piece(i) == "<tool>" else 1 for i in range(n)]
    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", [sp.id_to_piece(i) for i in range(n)])
    w.add_array("tokenizer.ggml.scores", [float(sp.get_score(i)) for i in range(n)])
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_uint32("tokenizer.ggml.unknown_token_id", sp.unk_id())
    w.add_uint32("tokenizer.ggml.bos_token_id", sp.bos_id())
    w.add_uint32("tokenizer.ggml.eos_token_id", sp.eos_id())
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_tensor("token_embd.weight", np.zeros((n, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, sp


def test_a_sentencepiece_vocabulary_gives_sentencepieces_ids(tmp_path):
    path, sp = spm_gguf(tmp_path)
    ours = gguf_tokenizer(read_gguf(path))
    for text in TEXTS:
        # llama.cpp splits out special and user-defined pieces first and tokenises each text
        # fragment with a space prefixed (sentencepiece prefixes only the start of the text)
        head, tool, tail = text.partition("<tool>")
        want = [sp.bos_id()] + sp.encode(head) + ([sp.piece_to_id(tool)] + sp.encode(tail) if tool else [])
        assert ours.encode(text) == want, text
        if not tool:
            assert ours.decode(ours.encode(text), skip_special_tokens=True) == text


@pytest.mark.parametrize("name", sorted(pretokenizers()))
def test_every_pre_tokenizer_llama_cpp_names_compiles(name):
    from tokenizers import Regex

    for regex in pretokenizers()[name]["regex"]:
        Regex(regex)
