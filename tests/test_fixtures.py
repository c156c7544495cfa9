"""Tiny fixtures are real checkpoints: mlx_lm and transformers load them, routing is varied,
and generation is deterministic."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from reap_stream.families import masking; from reap_stream.testing import synth


def _tokens(path, text, n=256):
    from mlx_lm.utils import load_tokenizer

    ids = load_tokenizer(path).encode(text)
    assert len(ids) >= n
    return ids[:n]


def _load(path):
    from mlx_lm.utils import load_model

    return load_model(path)[0]


def _logits(model, ids):
    import mlx.core as mx

    return np.array(model(mx.array(ids)[None])[0].astype(mx.float32))


@pytest.mark.parametrize("family", synth.FIRST_FAMILIES)
def test_fixture_loads_and_routes_every_expert(family, fixture_model, calib_text):
    import mlx_lm

    path = fixture_model(family)
    model, tokenizer = mlx_lm.load(str(path))
    ids = tokenizer.encode(calib_text())[:256]
    assert len(ids) == 256
    logits = _logits(model, ids)
    assert logits.shape == (256, synth.tiny_config(family)["vocab_size"])
    assert np.isfinite(logits).all()

    counts = masking.routing_counts(model, ids)
    assert len(counts) >= 3, "at least 3 MoE layers"
    cfg = synth.tiny_config(family)
    for layer, c in counts.items():
        assert c.sum() == 256 * cfg["num_experts_per_tok"]
        assert (c > 0).all(), f"layer {layer}: an expert is never routed: {c}"
        assert c.max() >= 1.5 * c.min(), f"layer {layer}: routing looks uniform: {c}"


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_sigmoid_fixtures_have_nonnegative_bias_and_dense_first_layer(family, fixture_model):
    model = _load(fixture_model(family))
    blocks = masking.moe_blocks(model)
    assert 0 not in blocks and sorted(blocks) == [1, 2, 3]
    for b in blocks.values():
        bias = np.array(b.gate.e_score_correction_bias)
        assert b.gate.e_score_correction_bias.dtype.size == 4  # kept float32, like real checkpoints
        assert (bias >= 0).all() and (bias < 0.5).all() and bias.std() > 0
        assert b.gate.n_group > 1


def test_tokenizer_chat_template_offline(fixture_model):
    from transformers import AutoTokenizer

    path = fixture_model("qwen3_moe")
    tok = AutoTokenizer.from_pretrained(str(path))
    assert len(tok) == synth.VOCAB_SIZE
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok.encode("def f(x):\n    return x")) == "def f(x):\n    return x"


def _read_header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), len(raw) - 8 - n


def test_shards_and_index_consistent(fixture_model):
    path = fixture_model("mixtral")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    total, seen = 0, {}
    for f in files:
        header, data_len = _read_header(path / f)
        assert header.pop("__metadata__") == {"format": "mlx"}
        end = 0
        for name, h in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
            assert h["data_offsets"][0] == end
            end = h["data_offsets"][1]
            seen[name] = f
        assert end == data_len
        total += data_len
    assert seen == index["weight_map"]
    from safetensors import safe_open  # the reference parser accepts our writer's files

    for f in files:
        with safe_open(str(path / f), framework="numpy") as st:
            assert sorted(st.keys()) == sorted(n for n, g in seen.items() if g == f)
    assert index["metadata"]["total_size"] == total
    # experts of one layer are not all in the first shard
    first = [n for n, f in seen.items() if f == files[0]]
    assert any("switch_mlp" not in n for n in first)


def test_regeneration_is_byte_identical(tmp_path):
    a = synth.make_mlx_fixture("deepseek_v3", tmp_path / "a", seed=3, dtype="bfloat16")
    b = synth.make_mlx_fixture("deepseek_v3", tmp_path / "b", seed=3, dtype="bfloat16")
    c = synth.make_mlx_fixture("deepseek_v3", tmp_path / "c", seed=4, dtype="bfloat16")
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    shard = "model-00001-of-00002.safetensors"
    assert (a / shard).read_bytes() != (c / shard).read_bytes()


def test_cached_fixture_rebuilds_incomplete(tmp_path):
    path = synth.cached_fixture("olmoe", "fp16", tmp_path)
    stamp = (path / "config.json").stat().st_mtime_ns
    assert synth.cached_fixture("olmoe", "fp16", tmp_path) == path
    assert (path / "config.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    (path / "model-00002-of-00002.safetensors").unlink()
    assert not synth.fixture_complete(path)
    assert synth.fixture_complete(synth.cached_fixture("olmoe", "fp16", tmp_path))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("variant", ["fp16", "bf16"])
def test_half_precision_fixture(variant, fixture_model, calib_text):
    import mlx.core as mx

    path = fixture_model("qwen3_moe", variant)
    want = {"fp16": mx.float16, "bf16": mx.bfloat16}[variant]
    model = _load(path)
    assert model.layers[0].mlp.switch_mlp.up_proj.weight.dtype == want
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == {"fp16": "float16", "bf16": "bfloat16"}[variant]
    # same weights as fp32 up to rounding; experts computed in float32 (CPU gather_mm is fp32-only)
    ref = _load(fixture_model("qwen3_moe"))
    model.set_dtype(mx.float32)
    ids = _tokens(path, calib_text(), 32)
    assert np.abs(_logits(model, ids) - _logits(ref, ids)).max() < 0.5


@pytest.mark.parametrize("family", synth.QUANTIZED_FAMILIES)
def test_quantized_fixture_loads_and_runs(family, fixture_model, calib_text):
    import mlx_lm

    path = fixture_model(family, "q4")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["group_size"] == synth.QUANT_GROUP_SIZE
    assert cfg["quantization_config"] == cfg["quantization"]
    model, tokenizer = mlx_lm.load(str(path))
    experts = model.layers[-1].mlp
    experts = getattr(experts, "switch_mlp", None) or experts.experts
    assert experts.up_proj.bits == 4
    ids = tokenizer.encode(calib_text())[:64]
    logits = _logits(model, ids)
    assert np.isfinite(logits).all()
    ref = _logits(_load(fixture_model(family)), ids)
    assert np.corrcoef(logits.ravel(), ref.ravel())[0, 1] > 0.7  # 4-bit noise + routing flips


@pytest.mark.parametrize("family", synth.HF_FAMILIES)
def test_hf_fixture_matches_mlx(family, fixture_model, calib_text):
    import torch
    from transformers import AutoModelForCausalLM

    hf_path, mlx_path = fixture_model(family, "hf"), fixture_model(family)
    index = json.loads((hf_path / "model.safetensors.index.json").read_text())
    assert not any("switch_mlp" in n for n in index["weight_map"])
    ids = _tokens(mlx_path, calib_text(), 64)
    hf = AutoModelForCausalLM.from_pretrained(str(hf_path), torch_dtype=torch.float32)
    with torch.no_grad():
        hf_logits = hf(torch.tensor([ids])).logits[0].numpy()
    mlx_logits = _logits(_load(mlx_path), ids)
    assert np.abs(hf_logits - mlx_logits).max() < 1e-4
