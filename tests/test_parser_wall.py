"""The parser wall: every file a user hands us, however broken, is refused with the one error type
(BadInput: exit 2 and one line at the CLI) in bounded time and memory. One test per case found
by fuzzing (tools/fuzz.py runs the open-ended search)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import error_line, run
from reap_stream.errors import BadInput
from reap_stream.families.model import open_model
from reap_stream.io.gguf import VType, read_gguf
from reap_stream.io.gguf_write import OutTensor, encode_header, encode_kv
from reap_stream.io.reading import MAX_JSON_DEPTH
from reap_stream.io.safetensors import read_shard_header
from reap_stream.planning.plan import Plan
from reap_stream.planning.planner import PlanOptions, make_plan
from reap_stream.telemetry.calibration import CalibrationOptions, build_calibration
from reap_stream.telemetry.collect import _check_run_record
from reap_stream.telemetry.store import TelemetryStore
from reap_stream.telemetry.synthetic import write_synthetic_telemetry
from reap_stream.telemetry.tokenizer import load_tokenizer
from reap_stream.testing import synth
from reap_stream.testing.gguf_convert import cached_gguf


DEEP = "[" * 100_000 + "]" * 100_000
CALIB = Path(__file__).resolve().parents[1] / "fixtures" / "calibration"


@pytest.fixture
def model(fixture_model, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(fixture_model("qwen3_moe"), dst)
    return dst


@pytest.fixture(scope="module")
def tok(fixture_model):
    return load_tokenizer(fixture_model("qwen3_moe"))


def edit_json(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def refused(call, *needles: str) -> str:
    with pytest.raises(BadInput) as e:
        call()
    for needle in needles:
        assert needle in str(e.value), str(e.value)
    return str(e.value)


def shard_with_header(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


# ---------------------------------------------------------------- deep nesting, everywhere JSON is read

def test_deep_nesting_is_refused_before_json_loads_in_every_json_file(model, fixture_model, tmp_path):
    refused(lambda: read_shard_header(shard_with_header(tmp_path / "s.safetensors", DEEP.encode())), "nests deeper")
    (model / "config.json").write_text(DEEP)
    refused(lambda: open_model(model), "config.json", f"nests deeper than {MAX_JSON_DEPTH} levels")
    shutil.copy(fixture_model("qwen3_moe") / "config.json", model / "config.json")
    (model / "model.safetensors.index.json").write_text('{"weight_map": ' + DEEP + "}")
    refused(lambda: open_model(model), "model.safetensors.index.json", "nests deeper")
    (tmp_path / "plan.json").write_text(DEEP)
    refused(lambda: Plan.load(tmp_path / "plan.json"), "plan.json", "nests deeper")
    store = write_synthetic_telemetry(tmp_path / "t.zarr", layers=2, experts=4, tokens=16, hidden=4)
    (store.path / "layer_001" / "zarr.json").write_text(DEEP)
    refused(lambda: store.read(1), "layer_001/zarr.json", "nests deeper")
    (tmp_path / "run.json").write_text(DEEP)
    refused(lambda: _check_run_record(tmp_path, {}), "run.json", "nests deeper")


def test_a_deep_calibration_line_is_refused_with_its_number(tok, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine"}\n{"text": ' + DEEP + "}\n")
    refused(lambda: build_calibration(CalibrationOptions(dataset_file=str(rows)), tok), "line 2 nests deeper")


def test_brackets_inside_strings_do_not_count_as_nesting(tmp_path):
    doc = {"layers": {}, "note": "[" * 500 + "{" * 500}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    refused(lambda: Plan.load(path), "not a reap-stream plan")  # parsed: refused for what it is, not its depth


# ---------------------------------------------------------------- wrong types and absurd numbers

@pytest.mark.parametrize("key,value,needle", [
    ("num_hidden_layers", None, "num_hidden_layers must be a positive integer"),
    ("num_hidden_layers", "4", "num_hidden_layers must be a positive integer"),
    ("num_hidden_layers", 10**12, "num_hidden_layers must be a positive integer up to 100,000"),
    ("num_experts_per_tok", 9, "num_experts_per_tok=9 exceeds the 8 experts"),
    ("mlp_only_layers", [10**15], "names a layer outside"),
    ("model_type", ["qwen3_moe"], "no model_type string"),
])
def test_config_values_of_the_wrong_type_or_size(model, key, value, needle):
    edit_json(model / "config.json", lambda c: c.__setitem__(key, value))
    refused(lambda: open_model(model), "config.json", needle)


@pytest.mark.parametrize("n_group,needle", [("x", "n_group must be a positive integer"),
                                             (16, "n_group=16 does not divide the 8 experts"),
                                             (3, "n_group=3 does not divide")])
def test_expert_groups_that_do_not_fit_are_refused_not_divided_by_zero(fixture_model, tmp_path, n_group, needle):
    model = tmp_path / "ds"
    shutil.copytree(fixture_model("deepseek_v3"), model)
    edit_json(model / "config.json", lambda c: c.__setitem__("n_group", n_group))
    refused(lambda: open_model(model), "config.json", needle)


@pytest.mark.parametrize("entry,needle", [
    ({"dtype": {}, "shape": [1], "data_offsets": [0, 4]}, "unknown dtype {}"),
    ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, "invalid shape"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}, "invalid data_offsets"),
    ({"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}, "do not match shape"),
])
def test_shard_header_entries_of_the_wrong_type(tmp_path, entry, needle):
    path = shard_with_header(tmp_path / "s.safetensors", json.dumps({"w": entry}).encode(), b"\0" * 4)
    refused(lambda: read_shard_header(path), needle)


def test_a_number_past_pythons_digit_limit_is_invalid_json(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text('{"format": "reap-stream-plan", "schema_version": ' + "9" * 5000 + "}")
    refused(lambda: Plan.load(path), "invalid JSON", "Exceeds the limit")


@pytest.mark.parametrize("model_block,needle", [
    ({"fingerprint": 7}, "model.fingerprint must be a string"),
    ({"num_experts": {"x": 8}}, "model.num_experts must be an integer or a map"),
    ({"moe_layers": "0-3"}, "model.moe_layers must be a list of layer numbers"),
    ({"top_k": 2.5}, "model.top_k must be an integer"),
])
def test_plan_model_fields_of_the_wrong_type(tmp_path, model_block, needle):
    doc = {"format": "reap-stream-plan", "schema_version": 1, "layers": {"0": {"kept": [0], "pruned": [1]}},
           "model": model_block}
    (tmp_path / "p.json").write_text(json.dumps(doc))
    refused(lambda: Plan.load(tmp_path / "p.json"), needle)


def test_layer_keys_in_other_digits_are_not_layer_numbers(tmp_path):
    for key in ("\u00b2", "\u0663", "1" * 5000):
        doc = {"format": "reap-stream-plan", "schema_version": 1, "layers": {key: {"kept": [0], "pruned": []}}}
        (tmp_path / "p.json").write_text(json.dumps(doc))
        refused(lambda: Plan.load(tmp_path / "p.json"), "is not a layer index")


def test_superscript_digits_in_tensor_names_are_just_other_names(model):
    from reap_stream.families.table import FAMILIES, classify

    fam = FAMILIES["qwen3_moe"]
    assert classify("model.layers.\u00b2.mlp.gate.weight", fam) is None
    assert classify("model.layers.1.mlp.experts.\u00b2.up_proj.weight", fam).kind == "stacked"
    assert classify("model.layers.1.mlp.experts.3.up_proj.weight", fam).expert == 3


# ---------------------------------------------------------------- index entries

@pytest.mark.parametrize("fname,needle", [
    ("bad\ud800.safetensors", "is not valid Unicode"),
    ("bad\x00.safetensors", "holds a NUL byte"),
    ("../outside.safetensors", "escapes the model directory"),
    ("/etc/passwd", "escapes the model directory"),
    ("n" * 300 + ".safetensors", "file name too long"),
    ("loop.safetensors", "too many levels of symbolic links"),
])
def test_index_entries_that_cannot_name_a_shard(model, fname, needle):
    os.symlink("loop.safetensors", model / "loop.safetensors")  # a link to itself
    index = model / "model.safetensors.index.json"
    edit_json(index, lambda d: d["weight_map"].__setitem__(next(iter(d["weight_map"])), fname))
    line = refused(lambda: open_model(model), needle)
    assert "\n" not in line


def test_names_with_newlines_and_undecodable_bytes_print_as_one_line(model, tmp_path):
    index = model / "model.safetensors.index.json"
    edit_json(index, lambda d: d["weight_map"].__setitem__("lm_head.weight", "a\nb.safetensors"))
    Plan({}, model={}).save(tmp_path / "plan.json")
    error_line(run("apply", model, tmp_path / "plan.json", "--out", tmp_path / "o"), "shard a\\nb.safetensors")
    odd = tmp_path / "x\ny\udcff"   # a name holding a newline and a byte that is not UTF-8
    error_line(run("plan", odd, "--ratio", 0.5, "--out", tmp_path / "p.json"), "x\\ny\\udcff", "not a telemetry store")


# ---------------------------------------------------------------- GGUF

def rewrite_gguf(src: Path, dst: Path, **edits: bytes) -> Path:
    """src with metadata entries replaced (key -> encoded entry), data untouched."""
    g = read_gguf(src)
    edits = {k.replace("__", "."): v for k, v in edits.items()}
    raws = [edits.pop(k, kv.raw) for k, kv in g.kvs.items()] + list(edits.values())
    tensors = [OutTensor(t.name, t.ne, t.ggml_type, t.offset, t.nbytes, ()) for t in g.tensors]
    dst.write_bytes(encode_header(g.version, raws, tensors, g.alignment) + src.read_bytes()[g.data_offset:])
    return dst


@pytest.fixture(scope="module")
def gguf_file(fixture_model, tmp_path_factory) -> Path:
    return cached_gguf("qwen3_moe", "q8_0", tmp_path_factory.mktemp("gguf"), fixture_model("qwen3_moe"))[0]


@pytest.mark.parametrize("key,entry,needle", [
    ("split.count", encode_kv("split.count", VType.STRING, "2"), "'split.count' must be an integer"),
    ("split.count", encode_kv("split.count", VType.FLOAT32, 2.0), "'split.count' must be an integer"),
    ("general.architecture", encode_kv("general.architecture", VType.ARRAY, ["qwen3moe"], VType.STRING),
     "'general.architecture' is missing or not a string"),
    ("qwen3moe.block_count", encode_kv("qwen3moe.block_count", VType.UINT64, 2**64 - 8), "must be an integer in 0..100,000"),
    ("qwen3moe.block_count", encode_kv("qwen3moe.block_count", VType.UINT32, 2**31), "must be an integer in 0..100,000"),
    ("qwen3moe.expert_group_count", encode_kv("qwen3moe.expert_group_count", VType.UINT32, 16),
     "expert_group_count=16 does not divide the 8 experts"),
    ("qwen3moe.nextn_predict_layers", encode_kv("qwen3moe.nextn_predict_layers", VType.UINT64, 2**64 - 8),
     "must be an integer in 0..4"),
])
def test_gguf_metadata_of_the_wrong_type_or_size(gguf_file, tmp_path, key, entry, needle):
    bad = rewrite_gguf(gguf_file, tmp_path / "m.gguf", **{key.replace(".", "__"): entry})
    refused(lambda: open_model(bad), "m.gguf", needle)


def test_gguf_counts_beyond_the_file_are_refused_before_any_range_is_built(gguf_file, tmp_path):
    raw = bytearray(gguf_file.read_bytes())
    for count in (2**64 - 8, 2**31):
        for at in (8, 16):  # tensor count, metadata count
            bad = bytearray(raw)
            bad[at:at + 8] = struct.pack("<Q", count)
            (tmp_path / "m.gguf").write_bytes(bad)
            refused(lambda: open_model(tmp_path / "m.gguf"), "cannot fit in the file")


# ---------------------------------------------------------------- Zarr stores

@pytest.fixture
def store(tmp_path) -> TelemetryStore:
    return write_synthetic_telemetry(tmp_path / "t.zarr", layers=2, experts=4, tokens=16, hidden=4)


@pytest.mark.parametrize("shape,needle", [
    ([10**12, 10**12], "beyond the"),                         # read through zarr: a MemoryError before
    ([4, 4, "x"], "not a list of array dimensions"),
])
def test_zarr_arrays_with_absurd_shapes(store, shape, needle):
    meta = store.path / "layer_001" / "coactivation" / "zarr.json"
    edit_json(meta, lambda m: m.__setitem__("shape", shape))
    refused(lambda: store.read(1), needle)


def test_a_zarr_array_of_millions_of_chunks_is_refused_without_reading_them(store):
    meta = store.path / "layer_001" / "expert_output_sum" / "zarr.json"
    edit_json(meta, lambda m: (m.__setitem__("shape", [5000, 2500]),
                               m["chunk_grid"]["configuration"].__setitem__("chunk_shape", [1, 1])))
    refused(lambda: store.read(1), "12,500,000 chunks")


def test_missing_or_wrong_layer_attributes_are_refused(store):
    edit_json(store.path / "layer_001" / "zarr.json", lambda m: m["attributes"].pop("tokens"))
    refused(lambda: store.read(1), "need integer 'tokens' and 'num_experts'")
    edit_json(store.path / "layer_000" / "zarr.json", lambda m: m["attributes"].__setitem__("num_experts", 5))
    refused(lambda: store.read(0), "does not fit the layer's 5 experts")
    refused(lambda: make_plan(store, PlanOptions("reap", ratio=0.5)), "layer_000")


# ---------------------------------------------------------------- calibration rows

def test_a_jsonl_whose_first_line_is_null_is_refused_not_a_segfault(tok, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('null\n{"text": "a"}\n')
    refused(lambda: build_calibration(CalibrationOptions(dataset_file=str(rows)), tok),
            "line 1 is not a JSON object (null)")


@pytest.mark.parametrize("row,needle", [
    ({"messages": [{"role": "user", "content": {"text": "hi"}}]}, "message 1's content is dict, not text"),
    ({"messages": [{"role": 7, "content": "hi"}]}, "message 1's role is int, not text"),
    ({"messages": [{"role": "user", "content": "a\ud800"}]}, "lone surrogate"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "the chat template cannot render"),
])
def test_chat_rows_are_validated_before_the_template_sees_them(tok, tmp_path, row, needle):
    template = tok.chat_template
    if "cannot render" in needle:  # a template that refuses a role, as many real ones do
        tok.chat_template = "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}" \
                            "{% endif %}{{ m.content }}{% endfor %}"
    try:
        rows = tmp_path / "chat.jsonl"
        rows.write_text(json.dumps(row) + "\n")
        refused(lambda: build_calibration(CalibrationOptions(dataset_file=str(rows), dataset_messages_field="messages"),
                                          tok), "line 1", needle)
    finally:
        tok.chat_template = template


def test_text_with_a_lone_surrogate_is_refused_with_its_row(tok, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine"}\n{"text": "bad \\ud800 text"}\n')
    refused(lambda: build_calibration(CalibrationOptions(dataset_file=str(rows)), tok), "line 2", "lone surrogate")


def test_packing_a_huge_row_into_tiny_windows_is_linear(tok, tmp_path):
    """--pack-samples --window-tokens 2 on one ~300 KB row: every token lands in a window, in order
    (the old loop shortened the list from the front once per window: quadratic, minutes here)."""
    text = (CALIB / "licence.txt").read_text()
    text = (text * (300_000 // len(text) + 1))[:300_000].replace("\n\n", "\n")
    (tmp_path / "big.txt").write_text(text)
    calib = build_calibration(CalibrationOptions(dataset_file=str(tmp_path / "big.txt"), pack_samples=True,
                                                 window_tokens=2), tok)
    stream = tok.encode(text) + [tok.eos_token_id]
    assert len(calib.sequences) == len(stream) // 2
    assert np.concatenate(calib.sequences).tolist() == stream[:len(calib.sequences) * 2]


def test_a_dataset_streamed_through_a_pipe_is_read_once(tok):
    """`--dataset-file <(cat rows.jsonl)`: a pipe, which a format probe must not consume."""
    data = (CALIB / "licence.jsonl").read_bytes()
    r, w = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(w, data), os.close(w)))
    writer.start()
    try:
        calib = build_calibration(CalibrationOptions(dataset_file=f"/dev/fd/{r}", dataset_format="jsonl"), tok)
    finally:
        writer.join()
        os.close(r)
    want = build_calibration(CalibrationOptions(dataset_file=str(CALIB / "licence.jsonl")), tok)
    assert [s.tolist() for s in calib.sequences] == [s.tolist() for s in want.sequences]


def test_process_substitution_works_from_a_shell(fixture_model, tmp_path):
    """The same through bash and the real CLI; the format is told from the first bytes."""
    cmd = (f"{sys.executable} -m reap_stream.cli eval {fixture_model('qwen3_moe')} --json --mode memory "
           f"--dataset-file <(cat {CALIB / 'licence.jsonl'}) --max-samples 2 --window-tokens 32")
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["calibration"]["source"]["rows_used"] == 2


# ---------------------------------------------------------------- non-regular files

def test_a_fifo_named_config_json_is_refused_without_blocking(model):
    os.unlink(model / "config.json")
    os.mkfifo(model / "config.json")

    def timeout(*_):
        raise TimeoutError("blocked on the FIFO")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(30)
    try:
        refused(lambda: open_model(model), "config.json", "is a FIFO (named pipe), not a regular file")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_a_run_record_that_is_not_an_object(tmp_path):
    (tmp_path / "run.json").write_text("[1, 2]")
    refused(lambda: _check_run_record(tmp_path, {"a": 1}), "run.json", "not a JSON object", "delete the work dir")


def test_the_model_of_a_generated_fixture_still_opens(model):
    """The wall refuses what is broken, not what is merely unusual: the fixture with a null
    rope_scaling and an empty mlp_only_layers opens."""
    assert open_model(model).structure.num_layers == synth.tiny_config("qwen3_moe")["num_hidden_layers"]


def test_a_config_mlx_lm_cannot_build_a_model_from_is_one_line(model):
    from reap_stream.io.safetensors import Checkpoint
    from reap_stream.runner.skeleton import build_skeleton

    edit_json(model / "config.json", lambda c: c.pop("hidden_size"))
    refused(lambda: build_skeleton(Checkpoint.open(model)), "config.json", "mlx_lm cannot build a qwen3_moe model")


def test_gguf_tokenizer_merges_naming_unknown_tokens_are_refused(gguf_file, tmp_path):
    from reap_stream.telemetry.gguf_tokenizer import gguf_tokenizer

    merges = list(read_gguf(gguf_file).get("tokenizer.ggml.merges"))
    bad = rewrite_gguf(gguf_file, tmp_path / "m.gguf", tokenizer__ggml__merges=encode_kv(
        "tokenizer.ggml.merges", VType.ARRAY, merges + ["\u00b2\u00b2 \u00b3\u00b3"], VType.STRING))
    refused(lambda: gguf_tokenizer(open_model(bad).gguf_parts[0]), "m.gguf", "'tokenizer.ggml.merges' entry",
            "names a token not in tokenizer.ggml.tokens")
