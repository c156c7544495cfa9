"""Llama-3 RoPE scaling read back from a GGUF's `rope_freqs` (the per-frequency factors llama.cpp's
converter writes instead of the config): mlx_lm's RoPE built from the recovered config has the
frequencies of the original config."""
from __future__ import annotations

import numpy as np
import pytest
from mlx_lm.models.rope_utils import Llama3RoPE

from reap_stream.errors import BadInput
from reap_stream.families.gguf_config import llama3_rope_scaling
from reap_stream.testing.gguf_metadata import llama3_rope_factors


@pytest.mark.parametrize("factor, low, high, old", [(8.0, 1.0, 4.0, 8192),    # Llama-3.1
                                                    (16.0, 1.0, 1.0, 8192),   # Llama-4 Scout (no ramp)
                                                    (32.0, 1.0, 4.0, 8192)])  # Llama-3.2
def test_recovered_llama3_scaling_gives_mlx_lm_the_same_frequencies(factor, low, high, old):
    theta, dims = 500000.0, 128
    original = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                "original_max_position_embeddings": old}
    recovered = llama3_rope_scaling(llama3_rope_factors(theta, dims, original), theta, dims, "m.gguf")
    want = np.array(Llama3RoPE(dims, base=theta, scaling_config=original)._freqs)
    got = np.array(Llama3RoPE(dims, base=theta, scaling_config=recovered)._freqs)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_unit_factors_mean_no_scaling_and_other_shapes_are_refused():
    assert llama3_rope_scaling(np.ones(64), 5e5, 128, "m.gguf") is None
    with pytest.raises(BadInput, match="rope_freqs"):
        llama3_rope_scaling(np.linspace(4.0, 1.0, 64), 5e5, 128, "m.gguf")   # long wavelengths unscaled
