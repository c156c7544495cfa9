"""A GGUF's routed experts read by expert range and run a chunk of experts at a time: the
telemetry bits of whole layers (the GGUF's tensors dequantised to float32 either way, a fused
gate_up tensor split back the same way), the stack never read whole."""
from __future__ import annotations

import pytest

from reap_stream.families.model import open_model
from reap_stream.io import gguf_read
from test_experts_chunked import WHOLE, _collect, assert_chunks_give_whole_layers


def _expert_bytes(model) -> int:
    """Bytes of one expert as the runner holds it (float32)."""
    from reap_stream.runner.skeleton import open_skeleton

    skeleton, weights = open_skeleton(open_model(model))
    sources = [weights.experts(i) for i in range(len(skeleton.layers))]   # None for a dense layer
    return max(s.expert_bytes for s in sources if s is not None)


@pytest.mark.parametrize("family,qtype,fused", [("gpt_oss", "q8_0", False), ("qwen3_moe", "q4_0", True),
                                                ("deepseek_v3", "f16", False)])
def test_experts_in_chunks_give_the_telemetry_bits_of_whole_layers(family, qtype, fused, gguf_model, tmp_path):
    model = gguf_model(family, qtype, fused=fused)
    # memory mode loads the whole GGUF as the stream runner loaded its layers before
    assert_chunks_give_whole_layers(model, _expert_bytes(model), tmp_path)


def test_stream_mode_reads_a_gguf_s_experts_by_range_a_chunk_at_a_time(gguf_model, tmp_path, monkeypatch):
    model = gguf_model("qwen3_moe", "q8_0", fused=True)
    slices: list[tuple[str, int, int]] = []
    whole: list[str] = []
    real_slices, real_tensor = gguf_read.read_slices, gguf_read.read_tensor

    def read_slices(t, first, count):
        slices.append((t.name, first, first + count))
        return real_slices(t, first, count)

    def read_tensor(t):
        whole.append(t.name)
        return real_tensor(t)

    monkeypatch.setattr("reap_stream.families.gguf_source.read_slices", read_slices)
    monkeypatch.setattr("reap_stream.families.gguf_source.read_tensor", read_tensor)
    _collect(model, tmp_path, "t", expert_chunk_bytes=3 * _expert_bytes(model))
    assert not any("_exps." in n for n in whole)   # never read whole
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in whole if n.startswith("blk.")} == \
        {f"blk.{i}" for i in range(4)}            # the layers' other tensors are read as before
    for layer in range(4):
        # gate and up are each one half of the fused tensor: it is read for each; 3 chunks of tokens
        assert sorted((lo, hi) for n, lo, hi in slices if n == f"blk.{layer}.ffn_gate_up_exps.weight") == \
            [(0, 3)] * 6 + [(3, 6)] * 6 + [(6, 8)] * 6
        assert sorted((lo, hi) for n, lo, hi in slices if n == f"blk.{layer}.ffn_down_exps.weight") == \
            [(0, 3)] * 3 + [(3, 6)] * 3 + [(6, 8)] * 3
    slices.clear()
    _collect(model, tmp_path, "w", expert_chunk_bytes=WHOLE)
    # a layer whose experts fit one chunk is read once for all chunks of tokens
    assert [s for s in slices if s[0] == "blk.0.ffn_down_exps.weight"] == [("blk.0.ffn_down_exps.weight", 0, 8)]


def test_a_family_whose_experts_are_not_read_by_range_loads_its_gguf_layers_whole(gguf_model):
    from reap_stream.families.expert_source import by_range
    from reap_stream.runner.skeleton import open_skeleton

    model = open_model(gguf_model("llama4"))
    assert not by_range(model.family)
    _, weights = open_skeleton(model)
    assert weights.experts(0) is None and weights.experts(1) is None
