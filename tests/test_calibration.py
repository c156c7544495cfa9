"""Calibration input: one source -> selected rows -> token ids (packed or not) -> Zarr in the work dir."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from reap_stream.testing import synth
from reap_stream.cli import LazyGroup
from reap_stream.cli.options import calibration_options
from reap_stream.telemetry.calibration import CalibrationOptions, build_calibration
from reap_stream.telemetry.tokens import load_tokens, save_tokens
from reap_stream.errors import BadInput
from cli_helpers import error_line, tree_bytes

CALIB = Path(__file__).resolve().parents[1] / "fixtures" / "calibration"
LICENCE_ROWS = [json.loads(line)["text"] for line in (CALIB / "licence.jsonl").read_text().splitlines()]


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    synth.write_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return _load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def bos_tok(tok_dir, tmp_path_factory):
    """The same vocabulary, but its encoder prepends BOS (like Llama / Mixtral tokenizers)."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    out = tmp_path_factory.mktemp("bos_tokenizer")
    shutil.copy(tok_dir / "tokenizer_config.json", out)
    raw = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    bos = synth.SPECIAL_TOKENS[0]
    raw.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, raw.token_to_id(bos))])
    raw.save(str(out / "tokenizer.json"))
    return _load_tokenizer(out)


@pytest.fixture(scope="module")
def no_template_tok(tok_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain_tokenizer")
    shutil.copy(tok_dir / "tokenizer.json", out)
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return _load_tokenizer(out)


def build(tok, **kw):
    return build_calibration(CalibrationOptions(**kw), tok)


def ids(seqs) -> list[list[int]]:
    return [s.tolist() for s in seqs]


# ---------------------------------------------------------------- sources and formats

def test_prompt_is_one_sequence_encoded_with_the_tokenizer_default(tok):
    calib = build(tok, prompt="Licensed under the Apache License")
    assert ids(calib.sequences) == [tok.encode("Licensed under the Apache License")]
    assert calib.sequences[0].dtype == np.int32
    assert calib.num_tokens == len(calib.sequences[0])
    assert calib.source["kind"] == "prompt"


def test_every_file_format_yields_the_same_rows(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": LICENCE_ROWS}), tmp_path / "licence.parquet")
    expected = [tok.encode(t) for t in LICENCE_ROWS]
    for path in (CALIB / "licence.jsonl", CALIB / "licence.json", CALIB / "licence.csv", tmp_path / "licence.parquet"):
        calib = build(tok, dataset_file=str(path))
        assert ids(calib.sequences) == expected, path.name
        assert calib.source["rows_used"] == len(LICENCE_ROWS)
    # text files: one row per blank-line-separated paragraph
    text = build(tok, dataset_file=str(CALIB / "licence.txt"))
    assert [tok.decode(s.tolist()).strip() for s in text.sequences] == LICENCE_ROWS
    assert text.source["format"] == "text"


def test_explicit_format_overrides_the_extension(tok, tmp_path):
    odd = tmp_path / "rows.dat"
    shutil.copy(CALIB / "licence.jsonl", odd)
    calib = build(tok, dataset_file=str(odd), dataset_format="jsonl", max_samples=3)
    assert ids(calib.sequences) == [tok.encode(t) for t in LICENCE_ROWS[:3]]


def test_dotted_text_field_reads_nested_rows_and_skips_empty_ones(tok):
    calib = build(tok, dataset_file=str(CALIB / "nested.jsonl"), dataset_text_field="doc.body")
    assert ids(calib.sequences) == [tok.encode(t) for t in LICENCE_ROWS]
    assert calib.source["rows_skipped"] == 1
    assert calib.source["rows_total"] == len(LICENCE_ROWS) + 1


def test_chat_rows_are_rendered_with_the_chat_template(tok):
    rows = [json.loads(line) for line in (CALIB / "chat.jsonl").read_text().splitlines()]
    calib = build(tok, dataset_file=str(CALIB / "chat.jsonl"), dataset_messages_field="messages")
    rendered = [tok.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    assert ids(calib.sequences) == [tok.encode(t, add_special_tokens=False) for t in rendered]
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert all(s[0] == im_start for s in calib.sequences)


def test_sharegpt_turns_render_like_role_content_messages(tok):
    sharegpt = build(tok, dataset_file=str(CALIB / "sharegpt.jsonl"), dataset_messages_field="conversation.turns")
    chat = build(tok, dataset_file=str(CALIB / "chat.jsonl"), dataset_messages_field="messages", max_samples=4)
    assert ids(sharegpt.sequences) == ids(chat.sequences)
    assert sharegpt.source["rows_skipped"] == 1  # the row with no turns


def test_bos_is_added_to_text_only_as_the_tokenizer_does_and_never_doubled_in_chat(bos_tok):
    bos = bos_tok.convert_tokens_to_ids(synth.SPECIAL_TOKENS[0])
    text = build(bos_tok, dataset_file=str(CALIB / "licence.jsonl"), max_samples=2)
    assert all(s[0] == bos and s[1] != bos for s in text.sequences)
    chat = build(bos_tok, dataset_file=str(CALIB / "chat.jsonl"), dataset_messages_field="messages", max_samples=2)
    assert all(bos not in s.tolist() for s in chat.sequences)


def test_mlx_lm_tokenizer_wrapper_gives_the_same_tokens(tok, tok_dir):
    from mlx_lm.tokenizer_utils import load as load_mlx_tokenizer

    wrapped = load_mlx_tokenizer(tok_dir)
    for kw in ({"dataset_file": str(CALIB / "licence.jsonl")},
               {"dataset_file": str(CALIB / "chat.jsonl"), "dataset_messages_field": "messages"}):
        assert build(wrapped, **kw).fingerprint == build(tok, **kw).fingerprint


def test_local_dataset_directory_with_splits(tok, tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": LICENCE_ROWS[:5]}),
                          "validation": datasets.Dataset.from_dict({"text": LICENCE_ROWS[5:8]})}
                         ).save_to_disk(str(tmp_path / "ds"))
    calib = build(tok, dataset=str(tmp_path / "ds"), dataset_split="validation")
    assert ids(calib.sequences) == [tok.encode(t) for t in LICENCE_ROWS[5:8]]
    with pytest.raises(BadInput, match="no split 'test' \\(splits: train, validation\\)"):
        build(tok, dataset=str(tmp_path / "ds"), dataset_split="test")


# ---------------------------------------------------------------- selection and shaping

def test_max_samples_takes_the_first_rows_without_a_seed(tok):
    calib = build(tok, dataset_file=str(CALIB / "licence.jsonl"), max_samples=4)
    assert ids(calib.sequences) == [tok.encode(t) for t in LICENCE_ROWS[:4]]


def test_seed_shuffles_deterministically(tok):
    f = str(CALIB / "licence.jsonl")
    a, b = build(tok, dataset_file=f, seed=7, max_samples=6), build(tok, dataset_file=f, seed=7, max_samples=6)
    other = build(tok, dataset_file=f, seed=8, max_samples=6)
    assert ids(a.sequences) == ids(b.sequences) and a.fingerprint == b.fingerprint
    assert ids(a.sequences) != ids(other.sequences)
    order = np.random.default_rng(7).permutation(len(LICENCE_ROWS))[:6]
    assert ids(a.sequences) == [tok.encode(LICENCE_ROWS[i]) for i in order]


def test_unpacked_rows_are_cut_to_the_window_and_the_token_budget(tok):
    calib = build(tok, dataset_file=str(CALIB / "licence.jsonl"), window_tokens=16, max_tokens=100)
    assert calib.num_tokens == 100
    assert [len(s) for s in calib.sequences] == [16] * 6 + [4]
    assert ids(calib.sequences)[:6] == [tok.encode(t)[:16] for t in LICENCE_ROWS[:6]]


def test_packing_fills_equal_windows_with_eos_between_samples(tok):
    window = 64
    calib = build(tok, dataset_file=str(CALIB / "licence.jsonl"), pack_samples=True, window_tokens=window)
    stream = [t for row in LICENCE_ROWS for t in tok.encode(row) + [tok.eos_token_id]]
    assert calib.packed and all(len(s) == window for s in calib.sequences)
    assert len(calib.sequences) == len(stream) // window
    assert np.concatenate(calib.sequences).tolist() == stream[:len(calib.sequences) * window]
    assert calib.source["dropped_tail_tokens"] == len(stream) % window


def test_packing_token_budget_counts_whole_windows(tok):
    calib = build(tok, dataset_file=str(CALIB / "licence.jsonl"), pack_samples=True, window_tokens=64, max_tokens=200)
    assert len(calib.sequences) == 3 and calib.num_tokens == 192


def test_sample_batch_size_caps_sequences_per_forward_chunk(tok):
    from reap_stream.runner import make_chunks

    calib = build(tok, dataset_file=str(CALIB / "licence.jsonl"), pack_samples=True, window_tokens=32,
                  max_tokens=32 * 5)
    assert [c.tokens.shape for c in make_chunks(calib.sequences, 4096, 2)] == [(2, 32), (2, 32), (1, 32)]
    assert [c.tokens.shape[0] for c in make_chunks(calib.sequences, 4096)] == [5]   # no cap: --chunk-tokens decides
    assert [c.tokens.shape[0] for c in make_chunks(calib.sequences, 32, 2)] == [1] * 5  # the token budget still holds


def test_fingerprint_covers_the_ids_and_the_shaping_options(tok):
    f = str(CALIB / "licence.jsonl")
    base = build(tok, dataset_file=f, max_samples=3)
    assert build(tok, dataset_file=f, max_samples=3).fingerprint == base.fingerprint
    # same ids (no row reaches either window), different options: another fingerprint
    wider = build(tok, dataset_file=f, max_samples=3, window_tokens=4096)
    assert ids(wider.sequences) == ids(base.sequences) and wider.fingerprint != base.fingerprint
    assert build(tok, dataset_file=f, max_samples=4).fingerprint != base.fingerprint
    assert base.fingerprint.startswith("sha256:") and len(base.fingerprint) == 7 + 64


# ---------------------------------------------------------------- Zarr in the work dir

def test_tokens_round_trip_through_zarr_byte_identically(tok, tmp_path):
    calib = build(tok, dataset_file=str(CALIB / "licence.jsonl"), window_tokens=40, seed=1)
    first, second = save_tokens(calib, tmp_path / "a.zarr"), save_tokens(calib, tmp_path / "b.zarr")
    back = load_tokens(second)
    assert ids(back.sequences) == ids(calib.sequences)
    assert back.fingerprint == calib.fingerprint and back.source == calib.source
    assert back.window_tokens == 40 and not back.packed
    assert tree_bytes(first) == tree_bytes(second)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))


def test_saving_again_replaces_the_store(tok, tmp_path):
    f = str(CALIB / "licence.jsonl")
    save_tokens(build(tok, dataset_file=f, max_samples=5), tmp_path / "c.zarr")
    save_tokens(build(tok, dataset_file=f, max_samples=2), tmp_path / "c.zarr")
    assert len(load_tokens(tmp_path / "c.zarr").sequences) == 2


def test_tampered_tokens_are_refused(tok, tmp_path):
    import zarr

    save_tokens(build(tok, dataset_file=str(CALIB / "licence.jsonl"), max_samples=3), tmp_path / "t.zarr")
    arr = zarr.open_array(str(tmp_path / "t.zarr" / "tokens"), mode="r+")
    arr[0] = arr[0] + 1
    with pytest.raises(BadInput, match="do not match the stored fingerprint"):
        load_tokens(tmp_path / "t.zarr")
    with pytest.raises(BadInput, match="not a calibration token store"):
        load_tokens(tmp_path / "missing.zarr")


@pytest.mark.parametrize("make,needle", [
    (lambda p: p.write_text("a file, not a directory"), "not a calibration token store (no zarr.json)"),
    (lambda p: (p.mkdir(), (p / "zarr.json").write_text("[1, 2]")), "not a Zarr group description"),
    (lambda p: (p.mkdir(), (p / "zarr.json").write_text('{"attributes": 7}')), "not a Zarr group description"),
    (lambda p: (p.mkdir(), (p / "zarr.json").write_text("{oops")), "invalid JSON"),
])
def test_a_token_store_that_is_not_a_zarr_group_is_bad_input(tmp_path, make, needle):
    make(tmp_path / "t.zarr")
    with pytest.raises(BadInput, match=re.escape(needle)):
        load_tokens(tmp_path / "t.zarr")


# ---------------------------------------------------------------- the click decorator and bad input

@pytest.fixture(scope="module")
def probe_cli(tok, no_template_tok):
    """A group with the real CLI's error handling and one command using `calibration_options`."""

    @click.command("probe")
    @calibration_options
    @click.option("--plain-tokenizer", is_flag=True)
    def probe(calibration: CalibrationOptions, plain_tokenizer: bool) -> None:
        calib = build_calibration(calibration, no_template_tok if plain_tokenizer else tok)
        click.echo(json.dumps(calib.summary(), sort_keys=True))

    class ProbeGroup(LazyGroup):
        def list_commands(self, ctx):
            return ["probe"]

        def get_command(self, ctx, name):
            return probe if name == "probe" else None

    return ProbeGroup(name="reap-stream")


def run_probe(probe_cli, *args):
    return CliRunner().invoke(probe_cli, ["probe", *args])


def test_decorator_passes_one_options_object(probe_cli):
    r = run_probe(probe_cli, "--dataset-file", str(CALIB / "licence.csv"), "--pack-samples", "--window-tokens", "32",
                  "--max-tokens", "96", "--seed", "3")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["num_sequences"] == 3 and summary["num_tokens"] == 96 and summary["packed"]
    assert summary["source"]["format"] == "csv"


def test_help_lists_every_calibration_option(probe_cli):
    out = CliRunner().invoke(probe_cli, ["probe", "--help"]).output
    for opt in ("--prompt", "--dataset", "--dataset-file", "--dataset-format", "--dataset-text-field",
                "--dataset-messages-field", "--dataset-split", "--max-samples", "--min-samples", "--max-tokens",
                "--pack-samples", "--window-tokens", "--seed"):
        assert opt in out


def _mkdir(path: Path) -> str:
    path.mkdir()
    return str(path)


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


BAD_CASES = {
    "two sources": (lambda t: ["--prompt", "hi", "--dataset-file", str(CALIB / "licence.jsonl")],
                    "--prompt/--dataset/--dataset-file", "got --prompt, --dataset-file"),
    "no source": (lambda t: [], "--prompt/--dataset/--dataset-file", "got none"),
    "empty file": (lambda t: ["--dataset-file", _write(t / "empty.jsonl", "")], "empty.jsonl", "dataset is empty"),
    "empty json array": (lambda t: ["--dataset-file", _write(t / "none.json", "[]")], "none.json",
                         "dataset is empty (0 rows)"),
    "missing field": (lambda t: ["--dataset-file", str(CALIB / "licence.csv"), "--dataset-text-field", "body"],
                      "licence.csv", "no field 'body' in rows (fields: id, text)"),
    "missing nested field": (lambda t: ["--dataset-file", str(CALIB / "nested.jsonl"), "--dataset-text-field", "doc.text"],
                             "nested.jsonl", "no field 'doc.text' (doc have fields: body, title)"),
    "min-samples unmet": (lambda t: ["--dataset-file", str(CALIB / "chat.jsonl"), "--dataset-messages-field", "messages",
                                     "--min-samples", "50"], "chat.jsonl", "fewer than --min-samples 50"),
    "unknown format": (lambda t: ["--dataset-file", str(CALIB / "licence.jsonl"), "--dataset-format", "xml"],
                       "--dataset-format", "unknown format 'xml'"),
    "unknown extension": (lambda t: ["--dataset-file", _write(t / "rows.xyz", "hello")], "rows.xyz",
                          "cannot tell the format"),
    "unreadable file": (lambda t: ["--dataset-file", str(t / "absent.jsonl")], "absent.jsonl", "not found"),
    "directory as file": (lambda t: ["--dataset-file", _mkdir(t / "rows.jsonl")], "rows.jsonl", "cannot read: is a directory"),
    "malformed jsonl": (lambda t: ["--dataset-file", _write(t / "bad.jsonl", '{"text": "a"}\n{"text": \n')],
                        "bad.jsonl", "line 2 is not valid JSON (Expecting value at column 10)"),
    "text field holds messages": (lambda t: ["--dataset-file", str(CALIB / "chat.jsonl"), "--dataset-text-field", "messages"],
                                  "chat.jsonl", "use --dataset-messages-field"),
    "chat field without chat template": (lambda t: ["--plain-tokenizer", "--dataset-file", str(CALIB / "chat.jsonl"),
                                                    "--dataset-messages-field", "messages"],
                                         "tokenizer_config.json", "tokenizer has no chat template"),
    "packed text shorter than one window": (lambda t: ["--prompt", "short", "--pack-samples", "--window-tokens", "64"],
                                            "--prompt", "fewer than one --window-tokens 64 window"),
    "negative budget": (lambda t: ["--prompt", "x", "--max-tokens", "0"], "--max-tokens", "must be at least 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_exits_2_with_one_line(probe_cli, tmp_path, case):
    make_args, where, what = BAD_CASES[case]
    r = run_probe(probe_cli, *make_args(tmp_path))
    error_line(r, where, what)


def test_absent_hub_dataset_offline_exits_2_with_one_line(probe_cli, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    r = run_probe(probe_cli, "--dataset", "nobody-here/absent-calibration-set")
    error_line(r, "not in the local cache", "--dataset-file", where="nobody-here/absent-calibration-set: ")
