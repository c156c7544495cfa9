"""Bad input to `reap-stream apply MODEL.gguf` (and collect / eval / full on a GGUF): exit code 2 and
one line naming the file and the fault; no traceback, no output (not even a partial one), the
source untouched."""
from __future__ import annotations

import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T

from reap_stream.io.files import sha256_file
from reap_stream.planning.plan import Plan
from cli_helpers import error_line, run
from test_gguf_apply import manual_plan, mlx_plan


def refuse(tmp_path: Path, model: Path, plan: Plan | Path, *needles: str, extra: tuple[str, ...] = ()) -> str:
    plan_path = plan if isinstance(plan, Path) else tmp_path / "plan.json"
    if isinstance(plan, Plan):
        plan.save(plan_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    before = sha256_file(model)
    res = run("apply", model, plan_path, "--out", out_dir / "o.gguf", *extra)
    line = error_line(res, *needles)
    assert sha256_file(model) == before
    assert list(out_dir.iterdir()) == []
    return line


@pytest.fixture
def model(gguf_model, tmp_path) -> Path:
    """A private copy of the qwen3moe Q8_0 GGUF that a test may corrupt."""
    dst = tmp_path / "model.gguf"
    shutil.copyfile(gguf_model("qwen3_moe", "q8_0"), dst)
    return dst


def patch(path: Path, pos: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        f.write(data)


def tensor_info_pos(path: Path, name: str) -> tuple[int, int]:
    """(position of n_dims, position of the data offset) of a tensor's info, found in the raw bytes."""
    raw = path.read_bytes()
    key = struct.pack("<Q", len(name)) + name.encode()
    at = raw.index(key) + len(key)
    n_dims = struct.unpack_from("<I", raw, at)[0]
    return at, at + 4 + 8 * n_dims + 4


def key_pos(path: Path, key: str) -> int:
    """Position right after a metadata key's name (its value type)."""
    raw = path.read_bytes()
    k = struct.pack("<Q", len(key)) + key.encode()
    return raw.index(k) + len(k)


# ---------------------------------------------------------------- broken files

def test_bad_magic(model, tmp_path):
    patch(model, 0, b"GGUX")
    refuse(tmp_path, model, mlx_plan("qwen3_moe"), "model.gguf", "not a GGUF file")


def test_truncated_header(model, tmp_path):
    dims, _ = tensor_info_pos(model, "blk.3.ffn_up_exps.weight")
    with open(model, "r+b") as f:
        f.truncate(dims + 2)
    refuse(tmp_path, model, mlx_plan("qwen3_moe"), "model.gguf", "truncated file: dims of 'blk.3.ffn_up_exps.weight'")
    with open(model, "r+b") as f:
        f.truncate(100)
    refuse(tmp_path, model, mlx_plan("qwen3_moe"), "model.gguf", "cannot fit in the file")


def test_truncated_tensor_data(model, tmp_path):
    with open(model, "r+b") as f:
        f.truncate(model.stat().st_size - 1000)
    refuse(tmp_path, model, mlx_plan("qwen3_moe"), "model.gguf", "'output.weight'", "runs past the end of the file")


def test_tensor_data_past_the_end(model, tmp_path):
    _, off = tensor_info_pos(model, "blk.1.ffn_up_exps.weight")
    patch(model, off, struct.pack("<Q", 1 << 40))
    refuse(tmp_path, model, mlx_plan("qwen3_moe"), "model.gguf", "'blk.1.ffn_up_exps.weight'", "past the end")


def test_misaligned_tensor_offset(model, tmp_path):
    _, off = tensor_info_pos(model, "blk.2.ffn_gate_exps.weight")
    value = struct.unpack("<Q", model.read_bytes()[off:off + 8])[0]
    patch(model, off, struct.pack("<Q", value + 4))
    refuse(tmp_path, model, mlx_plan("qwen3_moe"), "model.gguf", f"data offset {value + 4} is not aligned to 32")


def test_overlapping_tensors(model, tmp_path):
    _, a = tensor_info_pos(model, "blk.0.ffn_down_exps.weight")
    _, b = tensor_info_pos(model, "blk.0.ffn_gate_exps.weight")
    patch(model, b, model.read_bytes()[a:a + 8])
    refuse(tmp_path, model, mlx_plan("qwen3_moe"), "model.gguf", "overlap")


@pytest.mark.parametrize("pos,what", [(8, "tensor count"), (16, "metadata count")])
def test_absurd_counts(model, tmp_path, pos, what):
    patch(model, pos, struct.pack("<Q", 1 << 60))
    refuse(tmp_path, model, mlx_plan("qwen3_moe"), "model.gguf", f"{what} {1 << 60} cannot fit in the file")


def test_absurd_string_length(model, tmp_path):
    at = key_pos(model, "general.name")   # type u32, then the string's u64 length
    patch(model, at + 4, struct.pack("<Q", 1 << 62))
    refuse(tmp_path, model, mlx_plan("qwen3_moe"), "model.gguf", "'general.name'", f"string length {1 << 62} exceeds the file")


def test_absurd_array_length(model, tmp_path):
    at = key_pos(model, "tokenizer.ggml.tokens")   # type u32, element type u32, count u64
    patch(model, at + 8, struct.pack("<Q", 1 << 61))
    refuse(tmp_path, model, mlx_plan("qwen3_moe"), "model.gguf", "'tokenizer.ggml.tokens'", "cannot fit in the file")


def test_unknown_value_and_tensor_types(model, tmp_path):
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(model, copy)
    patch(model, key_pos(model, "general.name"), struct.pack("<I", 99))
    refuse(tmp_path, model, mlx_plan("qwen3_moe"), "unknown metadata value type 99")
    _, off = tensor_info_pos(copy, "blk.0.ffn_up_exps.weight")
    patch(copy, off - 4, struct.pack("<I", 1234))
    refuse(tmp_path, copy, mlx_plan("qwen3_moe"), "copy.gguf", "unknown ggml type 1234")


def test_too_many_dimensions(model, tmp_path):
    dims, _ = tensor_info_pos(model, "blk.0.ffn_up_exps.weight")
    patch(model, dims, struct.pack("<I", 7))
    refuse(tmp_path, model, mlx_plan("qwen3_moe"), "7 dimensions")


def test_missing_split_part(gguf_model, tmp_path):
    first = gguf_model("qwen3_moe", "f32", split=20)
    parts = tmp_path / "parts"
    parts.mkdir()
    for p in sorted(first.parent.glob("*.gguf"))[:2]:
        shutil.copyfile(p, parts / p.name)
    refuse(tmp_path, parts / first.name, mlx_plan("qwen3_moe"), "model-00003-of-00003.gguf", "split part 3 of 3 is missing")
    refuse(tmp_path, parts / "model-00002-of-00003.gguf", mlx_plan("qwen3_moe"), "open the first part")


# ---------------------------------------------------------------- plans that do not fit

def test_plan_with_the_wrong_layer_count(model, tmp_path):
    plan = mlx_plan("qwen3_moe")
    plan.model["num_layers"] = 6
    refuse(tmp_path, model, plan, "plan is for 6 layers; model.gguf has qwen3moe.block_count=4")


def test_plan_with_the_wrong_expert_count(model, tmp_path):
    plan = mlx_plan("qwen3_moe")
    plan.model["num_experts"] = 16
    refuse(tmp_path, model, plan, "plan is for 16 experts in layer 0; model.gguf holds 8 there")
    plan = manual_plan({1: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}, n=10)
    refuse(tmp_path, model, plan, "layer 1: expert 8 does not exist (layer has 8 experts)")


def test_plan_for_another_architecture(model, tmp_path):
    refuse(tmp_path, model, mlx_plan("mixtral"), "plan is for model_type 'mixtral' (GGUF architecture 'llama')",
           "model.gguf is architecture 'qwen3moe'")


def test_plan_for_a_layer_that_does_not_exist(model, tmp_path):
    refuse(tmp_path, model, manual_plan({9: [0, 1, 2, 3]}), "layer 9 is not an MoE layer")


def test_non_uniform_plan_for_a_llama_cpp_arch(model, tmp_path):
    line = refuse(tmp_path, model, manual_plan({1: [0, 1, 2, 3, 4, 5], 2: [0, 1, 2, 3]}),
                  "keeps 4..8 experts in different layers", "one qwen3moe.expert_count for all layers")
    assert "ds4-compact-v1" in line


def test_keeping_fewer_than_top_k(model, tmp_path):
    refuse(tmp_path, model, manual_plan({L: [3] for L in range(4)}), "keeps 1 experts, fewer than top_k=2")


def test_existing_output_without_overwrite(model, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "o.gguf").write_bytes(b"x")
    plan_path = tmp_path / "plan.json"
    mlx_plan("qwen3_moe").save(plan_path)
    res = run("apply", model, plan_path, "--out", out_dir / "o.gguf")
    error_line(res, "o.gguf: output exists; pass --overwrite")
    assert (out_dir / "o.gguf").read_bytes() == b"x"


def test_the_cli_applies_a_good_plan(model, tmp_path):
    """The same command with a fitting plan succeeds and prints a JSON summary."""
    import json

    plan_path = tmp_path / "plan.json"
    mlx_plan("qwen3_moe").save(plan_path)
    out = tmp_path / "o.gguf"
    res = run("apply", model, plan_path, "--out", out, "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{"):])
    assert summary["layout"] == "uniform" and summary["experts_after"] == 6 and summary["out"] == [str(out)]


def test_a_copy_buffer_under_4096_bytes_is_refused(model, tmp_path):
    line = refuse(tmp_path, model, mlx_plan("qwen3_moe"), extra=("--buffer-size", "1024"))
    assert line == "reap-stream: error: --buffer-size: must be at least 4096 bytes (got 1024)"


# ---------------------------------------------------------------- collect / eval / full on a GGUF

CALIB = Path(__file__).resolve().parents[1] / "fixtures" / "calibration" / "licence.jsonl"


def refuse_run(tmp_path: Path, model: Path, *needles: str, command: str = "collect") -> str:
    """collect (or full / eval) on a bad GGUF: exit 2, one line, nothing written, the source untouched."""
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    before = sha256_file(model)
    out = {"eval": (), "collect": ("--out", out_dir / "t.zarr"), "full": ("--out", out_dir / "o.gguf", "--ratio", "0.5")}
    out = out[command]
    res = run(command, model, "--dataset-file", CALIB, "--max-tokens", "256", *out)
    line = error_line(res, *needles)
    assert sha256_file(model) == before
    assert list(out_dir.iterdir()) == []
    return line


def converted(tmp_path: Path, monkeypatch, fixture_model, **patches) -> Path:
    """The qwen3_moe fixture converted with parts of the converter replaced."""
    from reap_stream.testing import gguf_convert

    for name, value in patches.items():
        monkeypatch.setattr(gguf_convert, name, value)
    return gguf_convert.convert_mlx_to_gguf(fixture_model("qwen3_moe"), tmp_path / "model.gguf")[0]


@pytest.mark.parametrize("command", ["collect", "full", "eval"])
def test_a_gguf_without_tokenizer_metadata(tmp_path, monkeypatch, fixture_model, command):
    model = converted(tmp_path, monkeypatch, fixture_model, _tokenizer=lambda writer, root: None)
    refuse_run(tmp_path, model, "model.gguf", "'tokenizer.ggml.model' is missing: the GGUF carries no tokenizer",
               command=command)


def test_a_tokenizer_llama_cpp_would_not_know(tmp_path, monkeypatch, fixture_model):
    def odd_tokenizer(writer, root):
        writer.add_string("tokenizer.ggml.model", "gpt2")
        writer.add_string("tokenizer.ggml.pre", "made-up")
        writer.add_array("tokenizer.ggml.tokens", ["a", "b"])

    model = converted(tmp_path, monkeypatch, fixture_model, _tokenizer=odd_tokenizer)
    refuse_run(tmp_path, model, "model.gguf", "tokenizer.ggml.pre 'made-up' is not a pre-tokenizer llama.cpp knows")

    def wordpiece(writer, root):
        writer.add_string("tokenizer.ggml.model", "bert")

    model.unlink()
    model = converted(tmp_path, monkeypatch, fixture_model, _tokenizer=wordpiece)
    refuse_run(tmp_path, model, "model.gguf", "tokenizer.ggml.model 'bert' is not supported")


def test_a_quant_type_gguf_py_cannot_dequantise_is_refused_by_collect_not_by_apply(tmp_path, monkeypatch,
                                                                                    fixture_model):
    from reap_stream.testing import gguf_convert

    odd = "blk.1.ffn_up_exps.weight"
    real_qtype, real_encode = gguf_convert._qtype, gguf_convert._encode

    def qtype(q, gname, arr):
        return T.Q8_1 if gname == odd else real_qtype(q, gname, arr)

    def encode(arr, t):   # Q8_1: 40 bytes per 32 values; the bytes do not matter here
        return np.zeros((*arr.shape[:-1], arr.shape[-1] // 32 * 40), np.uint8) if t == T.Q8_1 else real_encode(arr, t)

    model = converted(tmp_path, monkeypatch, fixture_model, _qtype=qtype, _encode=encode)
    refuse_run(tmp_path, model, "model.gguf", f"tensor '{odd}': ggml type Q8_1 cannot be dequantised by gguf-py's quants")
    pruned = tmp_path / "pruned.gguf"
    plan = tmp_path / "plan.json"
    mlx_plan("qwen3_moe").save(plan)
    assert run("apply", model, plan, "--out", pruned, "--quiet").exit_code == 0   # apply never dequantises
    assert gguf.GGUFReader(pruned).tensors[[t.name for t in gguf.GGUFReader(pruned).tensors].index(odd)].tensor_type == T.Q8_1


def test_an_architecture_whose_expert_tensors_are_missing(tmp_path):
    from reap_stream.testing.gguf_synth import write_moe_gguf

    model = write_moe_gguf(tmp_path / "model.gguf", "qwen3moe", roles={})
    refuse_run(tmp_path, model, "model.gguf", "no MoE expert tensors found for architecture 'qwen3moe' "
                                              "(gguf-py lists blk.N.ffn_gate_exps")


def test_an_architecture_mlx_lm_cannot_run(tmp_path):
    from reap_stream.testing.gguf_synth import write_moe_gguf

    model = write_moe_gguf(tmp_path / "model.gguf", "grovemoe")
    refuse_run(tmp_path, model, "model.gguf", "collect needs an mlx_lm model class; 'grovemoe' has none")


@pytest.mark.parametrize("command", ["collect", "full"])
def test_a_split_set_with_a_missing_part(gguf_model, tmp_path, command):
    src = gguf_model("qwen3_moe", "q8_0", split=20)
    parts = tmp_path / "parts"
    shutil.copytree(src.parent, parts)
    (parts / "model-00002-of-00003.gguf").unlink()
    refuse_run(tmp_path, parts / "model-00001-of-00003.gguf", "model-00002-of-00003.gguf",
               "split part 2 of 3 is missing", command=command)
