"""`reap-stream estimate`: the figures of a model from its headers, or from its config.json alone,
and one line for every input it cannot use. (Its memory figures against measured peaks:
tests/test_max_memory.py.)"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cli_helpers import error_line, run
from reap_stream.testing import synth

COUNT = ["--max-tokens", "512", "--window-tokens", "64"]


def estimate(*args) -> dict:
    r = run("estimate", *args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_a_bare_config_gives_the_figures_of_the_checkpoint(fixture_model, tmp_path):
    model = fixture_model("qwen3_moe")
    (tmp_path / "cfg").mkdir()
    shutil.copy(model / "config.json", tmp_path / "cfg" / "config.json")
    full = estimate(model, *COUNT, "--ratio", 0.5, "--no-calibrate")
    for bare in (tmp_path / "cfg", tmp_path / "cfg" / "config.json"):
        alone = estimate(bare, *COUNT, "--ratio", 0.5, "--no-calibrate")
        assert alone["model"]["from"] == "config.json" and full["model"]["from"].startswith("config.json + safetensors")
        for key in ("total_bytes", "expert_bytes_per_layer", "other_bytes_per_layer", "experts", "top_k", "layers"):
            assert alone["model"][key] == full["model"][key], key
        assert alone["memory"] == full["memory"] and alone["disk"] == full["disk"]


def test_the_output_size_at_a_ratio_is_what_apply_writes(fixture_model, tmp_path):
    model = fixture_model("qwen3_moe")
    figures = estimate(model, *COUNT, "--ratio", 0.5, "--no-calibrate")
    assert run("init", "--out", tmp_path / "t.zarr", "--like", model, "--tokens", 128).exit_code == 0
    assert run("plan", tmp_path / "t.zarr", "--out", tmp_path / "p.json", "--ratio", 0.5, "--model", model).exit_code == 0
    written = json.loads(run("apply", model, tmp_path / "p.json", "--out", tmp_path / "o", "--dry-run", "--json").output)
    assert written["source_tensor_bytes"] == figures["model"]["total_bytes"]
    # experts only: apply also drops the pruned experts' router rows (a few KB here)
    assert 0 <= figures["disk"]["output_bytes"] - written["tensor_bytes"] < 0.01 * written["tensor_bytes"]


def test_a_gguf_is_estimated_from_its_header_as_apply_writes_it(gguf_model, tmp_path):
    import gguf

    model = gguf_model("qwen3_moe", "q8_0")
    figures = estimate(model, *COUNT, "--ratio", 0.5, "--no-calibrate")
    assert figures["model"]["from"].startswith("GGUF header") and figures["memory"]["experts_by_range"]
    layer0 = [t for t in gguf.GGUFReader(model).tensors if t.name.startswith("blk.0.")]   # as gguf-py reads them
    assert figures["model"]["expert_bytes_per_layer"] == sum(int(t.n_bytes) for t in layer0 if "_exps." in t.name)
    assert figures["model"]["other_bytes_per_layer"] == sum(int(t.n_bytes) for t in layer0 if "_exps." not in t.name)
    assert run("init", "--out", tmp_path / "t.zarr", "--like", model, "--tokens", 128).exit_code == 0
    assert run("plan", tmp_path / "t.zarr", "--out", tmp_path / "p.json", "--ratio", 0.5, "--model", model).exit_code == 0
    written = json.loads(run("apply", model, tmp_path / "p.json", "--out", tmp_path / "o.gguf", "--dry-run", "--json").output)
    header = written["bytes_in"] - figures["model"]["total_bytes"]   # metadata and tokenizer: the tensors as stored
    assert 0 < header < 0.1 * written["bytes_in"]
    # experts only, as stored (Q8_0): apply also drops the pruned experts' router rows (4 KB here)
    assert 0 <= figures["disk"]["output_bytes"] - (written["bytes_out"] - header) < 0.02 * written["bytes_out"]


def test_quantised_as_mlx_lm_would(tmp_path):
    cfg = {**synth.tiny_config("qwen3_moe"), "moe_intermediate_size": 128}
    d, f, e = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts"]
    q4 = estimate(_write(tmp_path / "config.json", json.dumps(cfg)), *COUNT, "--quantize", "4", "--no-calibrate")["model"]
    # 4-bit codes plus a float32 scale and bias per group of 64 inputs, for the three projections
    assert q4["expert_bytes_per_layer"] == e * (2 * (f * d // 2 + 2 * f * (d // 64) * 4) + (d * f // 2 + 2 * d * (f // 64) * 4))
    assert q4["quantization"]["bits"] == 4 and q4["quantization"]["group_size"] == 64
    # a projection whose inputs do not divide into groups stays unquantised, as mlx_lm leaves it
    narrow = estimate(_write(tmp_path / "n" / "config.json", json.dumps({**cfg, "moe_intermediate_size": 32})),
                      *COUNT, "--quantize", "4", "--no-calibrate")["model"]
    f = 32
    assert narrow["expert_bytes_per_layer"] == e * (2 * (f * d // 2 + 2 * f * (d // 64) * 4) + d * f * 4)


def test_the_time_bound_comes_from_this_machine(fixture_model, tmp_path):
    figures = estimate(fixture_model("qwen3_moe"), *COUNT)
    t = figures["time"]
    assert t["read_bytes_per_s"] > 0 and t["gemm_flops_per_s"] > 0 and t["bound_s"] > 0
    assert t["read_measured_on"].endswith(".safetensors")


def test_max_memory_gives_the_chunking_or_the_least_it_needs(fixture_model):
    model = fixture_model("qwen3_moe")
    fits = estimate(model, *COUNT, "--max-memory", "8GB", "--no-calibrate")["memory"]["max_memory"]
    assert fits["fits"] and fits["peak_bytes"] <= 8e9 and fits["chunk_tokens"] == 512
    short = estimate(model, *COUNT, "--max-memory", "100MB", "--no-calibrate")["memory"]["max_memory"]
    assert not short["fits"] and "is too small for this model" in short["why"] and "at least" in short["why"]


@pytest.mark.parametrize("form", ["safetensors", "gguf"])   # a GGUF: its own tokenizer metadata
def test_a_tokenised_calibration_counts_its_tokens(form, fixture_model, gguf_model):
    calib = Path(__file__).resolve().parents[1] / "fixtures" / "calibration" / "licence.jsonl"
    model = fixture_model("qwen3_moe") if form == "safetensors" else gguf_model("qwen3_moe")
    figures = estimate(model, "--dataset-file", calib, "--pack-samples", "--window-tokens", "64",
                       "--max-tokens", "256", "--no-calibrate")
    assert figures["calibration"] == {"tokens": 256, "seq_len": 64, "exact": True}


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", ["missing", "not json", "no model_type", "unknown to mlx_lm", "not an moe",
                                  "no token count", "bad ratio", "broken gguf", "gguf quantised again"])
def test_bad_inputs_are_one_line(case, fixture_model, gguf_model, tmp_path):
    args, where, needle = [tmp_path / "m", *COUNT], tmp_path / "m" / "config.json", ""
    if case == "missing":
        (tmp_path / "m").mkdir()
        needle = "missing"
    elif case == "not json":
        _write(where, "{oops")
        needle = "invalid JSON"
    elif case == "no model_type":
        _write(where, json.dumps({"hidden_size": 8}))
        needle = "no model_type"
    elif case == "unknown to mlx_lm":
        _write(where, json.dumps({"model_type": "no_such_model"}))
        needle = "mlx_lm cannot build this model"
    elif case == "not an moe":
        cfg = {**synth.tiny_config("qwen3_moe"), "model_type": "qwen3", "intermediate_size": 64}
        _write(where, json.dumps(cfg))
        needle = "builds no routed experts"
    elif case == "no token count":
        args, where, needle = [fixture_model("qwen3_moe")], "--max-tokens", "give the number of calibration tokens"
    elif case == "bad ratio":
        args, where, needle = [fixture_model("qwen3_moe"), *COUNT, "--ratio", "1.5"], "--ratio", "outside [0, 1)"
    elif case == "broken gguf":
        gguf = tmp_path / "m.gguf"
        gguf.write_bytes(b"GGUF" + b"\0" * 60)
        args, where, needle = [gguf, *COUNT], gguf, "GGUF version 0 is not supported"
    else:
        args, where, needle = [gguf_model("qwen3_moe", "q8_0"), *COUNT, "--quantize", "4"], "--quantize", "a GGUF is estimated as it is"
    error_line(run("estimate", *args, "--no-calibrate"), needle, where=where)
