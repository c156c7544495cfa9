"""--max-memory keeps the process's peak RSS (VmHWM) under the limit on a model whose layers do
not fit it whole, `estimate` predicts the measured peak within ±25 %, and a limit that nothing
fits is refused up front with the least that is needed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import error_line, run
from reap_stream.testing.scaled import write_scaled
from reap_stream.testing.synth import tiny_config

CALIB = str(Path(__file__).resolve().parents[1] / "fixtures" / "calibration" / "licence.jsonl")
TOKENS = ["--dataset-file", CALIB, "--pack-samples", "--window-tokens", "128", "--max-tokens", "1024"]
# Qwen3-MoE layers of ~200 MB of bf16 experts each (64 experts, hidden 1024, width 512)
SHAPE = {"hidden_size": 1024, "num_experts": 64, "moe_intermediate_size": 512, "num_experts_per_tok": 4,
         "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128, "num_hidden_layers": 2,
         "vocab_size": 2048, "torch_dtype": "bfloat16"}
LIMIT_MB = 500


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    return write_scaled({**tiny_config("qwen3_moe"), **SHAPE}, tmp_path_factory.mktemp("big") / "m")


# a GGUF of Qwen3-MoE layers of ~200 MB of experts once dequantised to float32 (64 experts, hidden
# 512, width 512), stored as Q8_0 with gate and up fused: the quantised and fused reads of the model
GGUF_SHAPE = {**SHAPE, "hidden_size": 512, "head_dim": 64}
GGUF_LIMIT_MB = 380


@pytest.fixture(scope="module")
def big_gguf(tmp_path_factory) -> Path:
    from reap_stream.testing.gguf_convert import convert_mlx_to_gguf

    root = tmp_path_factory.mktemp("big_gguf")
    mlx = write_scaled({**tiny_config("qwen3_moe"), **GGUF_SHAPE}, root / "mlx")
    return convert_mlx_to_gguf(mlx, root / "model.gguf", qtype="q8_0", fused=True)[0]


def _cli(*args) -> dict:
    res = subprocess.run([sys.executable, "-m", "reap_stream.cli", *map(str, args), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _estimate(model: Path, *args) -> dict:
    r = run("estimate", model, *TOKENS, "--no-calibrate", "--json", *args)
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


@pytest.fixture(scope="module")
def fulls(big, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """`full` on the big model without a limit and with --max-memory LIMIT_MB (fresh processes)."""
    root = tmp_path_factory.mktemp("fulls")
    limits = {"unlimited": (), "limited": ("--max-memory", f"{LIMIT_MB}MB")}
    return {name: (root / name, _cli("full", big, *TOKENS, "--ratio", 0.5, "--out", root / name, *args))
            for name, args in limits.items()}


def test_full_stays_under_max_memory_and_prunes_as_an_unlimited_run(fulls):
    (_, unlimited), (out, limited) = fulls["unlimited"], fulls["limited"]
    assert unlimited["collect"]["peak_rss_mib"] * 2**20 > LIMIT_MB * 1e6          # a whole layer does not fit
    assert limited["collect"]["peak_rss_mib"] * 2**20 <= LIMIT_MB * 1e6
    layer_experts = 64 * 3 * 1024 * 512 * 2
    assert limited["collect"]["expert_chunk_bytes"] < layer_experts / 2        # experts in several chunks
    # fewer tokens per chunk change float sums in their last bits, not what is pruned
    plans = [json.loads((path / "reap_plan.json").read_text())["layers"] for path, _ in fulls.values()]
    assert {k: v["kept"] for k, v in plans[0].items()} == {k: v["kept"] for k, v in plans[1].items()}
    assert run("verify", out, "--quiet").exit_code == 0


def test_estimate_predicts_the_measured_peak_within_a_quarter(big, fulls, fixture_model, tmp_path):
    small = fixture_model("qwen3_moe")
    measured = {"fixture": _cli("collect", small, *TOKENS, "--out", tmp_path / "t.zarr")["peak_rss_mib"] * 2**20,
                **{name: summary["collect"]["peak_rss_mib"] * 2**20 for name, (_, summary) in fulls.items()}}
    predicted = {"fixture": _estimate(small)["memory"]["chunked_peak_bytes"],
                 "unlimited": _estimate(big)["memory"]["chunked_peak_bytes"],
                 "limited": _estimate(big, "--max-memory", f"{LIMIT_MB}MB")["memory"]["max_memory"]["peak_bytes"]}
    for name, peak in measured.items():
        assert 0.75 <= predicted[name] / peak <= 1.25, (name, predicted[name] / 2**20, peak / 2**20)


@pytest.mark.parametrize("form", ["big", "big_gguf"])
@pytest.mark.parametrize("command", ["collect", "eval", "full"])
def test_a_limit_nothing_fits_is_refused_up_front(command, form, request, tmp_path):
    out = tmp_path / "out"
    args = [command, request.getfixturevalue(form), *TOKENS, "--max-memory", "100MB"]
    args += {"collect": ["--out", out], "eval": [], "full": ["--ratio", 0.5, "--out", out]}[command]
    line = error_line(run(*args))
    assert line.startswith("reap-stream: error: --max-memory: 100 MB is too small for this model: one sequence of "
                           "128 tokens and one expert at a time need at least ")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_memory_mode_is_refused_when_the_whole_model_does_not_fit(big, tmp_path):
    line = error_line(run("collect", big, *TOKENS, "--mode", "memory", "--max-memory", f"{LIMIT_MB}MB",
                          "--out", tmp_path / "o"))
    assert line.startswith("reap-stream: error: --max-memory: memory mode holds the whole model: it needs at least ")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", ["0", "-1GB", "lots", "1.5XB"])
def test_an_unreadable_limit_names_the_option(value, big, tmp_path):
    line = error_line(run("collect", big, *TOKENS, "--max-memory", value, "--out", tmp_path / "o"))
    assert line.startswith("reap-stream: error: --max-memory: cannot read size")


@pytest.mark.parametrize("form", ["safetensors", "gguf"])
def test_eval_under_a_limit_gives_the_perplexity_of_an_unlimited_run(form, fixture_model, gguf_model):
    model = fixture_model("qwen3_moe") if form == "safetensors" else gguf_model("qwen3_moe", "q8_0")
    results = [json.loads(run("eval", model, *TOKENS, "--json", *args).output)
               for args in ((), ("--max-memory", "4GB"))]
    assert results[0]["num_predictions"] == results[1]["num_predictions"] > 0
    assert abs(results[0]["perplexity"] - results[1]["perplexity"]) <= 1e-5 * results[0]["perplexity"]


def test_a_family_read_a_whole_layer_at_a_time_is_planned_whole(fixture_model, tmp_path):
    """Llama-4's experts see a router-scaled input, so its layers are read whole
    (families/expert_source.by_range): --max-memory chooses tokens only, estimate says so, and a
    limit below a whole layer is refused naming it."""
    model = fixture_model("llama4")
    figures = _estimate(model, "--max-memory", "4GB")["memory"]
    assert figures["experts_by_range"] is False
    assert figures["chunked_peak_bytes"] == figures["whole_layer_peak_bytes"]
    assert figures["max_memory"]["fits"] and figures["max_memory"]["expert_chunk_bytes"] is None
    ranged = _estimate(fixture_model("qwen3_moe"), "--max-memory", "4GB")["memory"]
    assert ranged["experts_by_range"] is True and ranged["max_memory"]["expert_chunk_bytes"] is not None
    summary = _cli("collect", model, *TOKENS, "--max-memory", "4GB", "--out", tmp_path / "t.zarr")
    assert summary["expert_chunk_bytes"] is None and summary["layers"]
    line = error_line(run("collect", model, *TOKENS, "--max-memory", "100MB", "--out", tmp_path / "o"))
    assert "and a whole layer's experts (this model's are not read by range) need at least" in line


def test_a_gguf_stays_under_max_memory_and_estimate_predicts_its_peak(big_gguf, tmp_path):
    runs = {name: _cli("collect", big_gguf, *TOKENS, "--out", tmp_path / f"{name}.zarr", *args)
            for name, args in (("unlimited", ()), ("limited", ("--max-memory", f"{GGUF_LIMIT_MB}MB")))}
    measured = {name: summary["peak_rss_mib"] * 2**20 for name, summary in runs.items()}
    assert measured["unlimited"] > GGUF_LIMIT_MB * 1e6 >= measured["limited"]   # a whole layer does not fit
    assert runs["limited"]["expert_chunk_bytes"] < 64 * 3 * 512 * 512 * 4 / 2   # experts in several chunks
    limited = _estimate(big_gguf, "--max-memory", f"{GGUF_LIMIT_MB}MB")["memory"]["max_memory"]
    assert limited["expert_chunk_bytes"] == runs["limited"]["expert_chunk_bytes"]   # the chunking collect chose
    predicted = {"unlimited": _estimate(big_gguf)["memory"]["chunked_peak_bytes"], "limited": limited["peak_bytes"]}
    for name, peak in measured.items():
        assert 0.75 <= predicted[name] / peak <= 1.25, (name, predicted[name] / 2**20, peak / 2**20)
