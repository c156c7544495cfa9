"""Tiny fixtures as transformers builds and saves them: each family's own HF layout (per-expert,
w1/w2/w3, fused or stacked experts), weights seeded by role as the MLX fixtures' are (synth.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..families.table import FAMILIES
from .synth import HIDDEN, _build_model, _init_value, _write_json, tiny_config, write_tokenizer


def transformers_model_type(family: str) -> str | None:
    """The model_type transformers knows the family by (its own, or an alias mlx_lm maps to it),
    None where transformers has no class for it."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    fam = FAMILIES[family]
    if fam.text_config:  # a wrapper's transformers class builds its vision tower too: not here
        return None
    for name in (*fam.aliases, family):
        if name in CONFIG_MAPPING and name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            return name
    return None


def make_transformers_fixture(family: str, out_dir: Path, *, seed: int = 0) -> Path:
    """The family's tiny model as transformers builds and saves it (its own HF layout: per-expert,
    fused or stacked experts), weights seeded by role as the MLX fixtures' are (float32)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_type = transformers_model_type(family)
    if hf_type is None:
        raise ValueError(f"transformers has no causal-LM class for {family!r}")
    fam = FAMILIES[family]
    cfg = tiny_config(family)
    text = {k: v for k, v in (cfg["text_config"] if fam.text_config else cfg).items() if k != "model_type"}
    if "full_attention_interval" in text:  # mlx_lm derives the layer types from it; transformers reads a list
        n = text["full_attention_interval"]
        text["layer_types"] = ["full_attention" if (i + 1) % n == 0 else "linear_attention"
                               for i in range(text["num_hidden_layers"])]
    names = {k for k, _ in _flat(_build_model(cfg))}
    text["tie_word_embeddings"] = not any(k.endswith("lm_head.weight") for k in names)
    hf_config = AutoConfig.for_model(hf_type, **{k: v for k, v in text.items() if v is not None})
    with torch.device("meta"):  # a config key transformers reads by another name could mean a full-size model
        size = sum(p.numel() for p in AutoModelForCausalLM.from_config(hf_config).parameters())
    if size > 5_000_000:
        raise ValueError(f"{family}: transformers would build {size:,} parameters from the tiny config")
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    rng = np.random.default_rng(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            p.copy_(torch.from_numpy(_init_value(name, tuple(p.shape), rng, HIDDEN, fam).astype(np.float32)))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    for key, value in text.items():  # keys transformers 5 renames or folds (rope_theta ...), as published
        per_layer_type = all(isinstance(v, dict) for v in (config.get("rope_parameters") or {"": 0}).values())
        if not (key == "rope_scaling" and value is None and per_layer_type):  # would void per-type rope
            config.setdefault(key, value)
    _write_json(out_dir / "config.json", config)
    write_tokenizer(out_dir)
    return out_dir


def _flat(model) -> list:
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())
