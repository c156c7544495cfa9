"""Stream mode never holds the model: its peak memory does not grow with the number of layers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from reap_stream.testing import synth

LICENCE = str(Path(__file__).resolve().parents[1] / "fixtures" / "calibration" / "licence.jsonl")
# experts of ~25 MB per layer: holding 6 extra layers would show as ~150 MB
SHAPE = {"hidden_size": 128, "moe_intermediate_size": 256, "num_experts": 64, "num_experts_per_tok": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32}
LAYER_BYTES = SHAPE["num_experts"] * 3 * SHAPE["hidden_size"] * SHAPE["moe_intermediate_size"] * 4


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("depth")
    return {n: synth.make_mlx_fixture("qwen3_moe", root / f"L{n}", num_shards=1,
                                      config_overrides={**SHAPE, "num_hidden_layers": n}) for n in (2, 8)}


def _peak_mib(model: Path, mode: str, out: Path) -> float:
    cmd = [sys.executable, "-m", "reap_stream.cli", "collect", str(model), "--dataset-file", LICENCE,
           "--pack-samples", "--window-tokens", "64", "--max-tokens", "512", "--mode", mode,
           "--out", str(out), "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def test_stream_peak_memory_does_not_grow_with_depth(models, tmp_path):
    extra_mib = 6 * LAYER_BYTES / 2**20                                  # the weights of 6 more layers
    stream = {n: _peak_mib(m, "stream", tmp_path / f"s{n}.zarr") for n, m in models.items()}
    memory = {n: _peak_mib(m, "memory", tmp_path / f"m{n}.zarr") for n, m in models.items()}
    assert memory[8] - memory[2] > 0.8 * extra_mib                      # the measure sees whole models
    assert stream[8] - stream[2] < 0.25 * extra_mib, (stream, memory)
