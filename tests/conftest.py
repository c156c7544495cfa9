"""Shared pytest fixtures: cached tiny checkpoints and deterministic calibration text."""

from __future__ import annotations

import argparse
import inspect
import os
from pathlib import Path

import pytest

from reap_stream.blas import ensure_blas

ensure_blas()  # before anything imports mlx, as the CLI does

from reap_stream.testing import synth  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURE_ROOT = Path(os.environ.get("REAP_STREAM_FIXTURES", REPO / "fixtures" / "generated"))


@pytest.fixture(scope="session")
def fixture_model():
    """fixture_model(family, variant="fp32") -> Path of a cached tiny checkpoint.
    variant: "fp32" | "fp16" | "bf16" | "q4" (4-bit, mlx_lm's quantisation) | "hf" (synth.HF_FAMILIES) |
    "transformers" (as transformers writes it: testing/hf_fixture.py)."""

    def get(family: str, variant: str = "fp32") -> Path:
        return synth.cached_fixture(family, variant, FIXTURE_ROOT)

    return get


@pytest.fixture(scope="session")
def calib_text():
    """calib_text(n_chars=4000) -> a deterministic chunk of real text (Python stdlib source)."""
    source = inspect.getsource(argparse)

    def get(n_chars: int = 4000) -> str:
        return (source * (1 + n_chars // len(source)))[:n_chars]

    return get


@pytest.fixture(scope="session")
def gguf_model(tmp_path_factory):
    """gguf_model(family, qtype="f32", split=0, fused=False) -> first GGUF file converted from the MLX
    fixture (testing/gguf_convert; `fused`: gate and up experts in one ffn_gate_up_exps); family
    "deepseek4" is the deepseek4-like construction (from the deepseek_v3 fixture)."""
    from reap_stream.testing.gguf_convert import cached_gguf

    root = tmp_path_factory.mktemp("gguf")

    def get(family: str, qtype: str = "f32", split: int = 0, fused: bool = False) -> Path:
        mlx = synth.cached_fixture("deepseek_v3" if family == "deepseek4" else family, "fp32", FIXTURE_ROOT)
        return cached_gguf(family, qtype, root, mlx, split=split, fused=fused)[0]

    return get
