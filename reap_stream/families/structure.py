"""The MoE structure of a model (from config + tensor index), its fingerprint, and plan checks.

Structure (model type, MoE layers, experts per layer, top-k, groups) is what makes a plan fit a model
in any format; the fingerprint additionally ties a plan to one set of weights.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from ..io.safetensors import Checkpoint
from ..errors import BadInput
from .table import Family, classify, family_of, num_experts, top_k
from ..planning.plan import Plan


@dataclass
class MoEStructure:
    model_type: str
    num_layers: int
    layer_experts: dict[int, int]   # MoE layer -> routed experts it holds now
    top_k: int
    n_group: int = 1
    topk_group: int = 1
    frozen_layers: list[int] = field(default_factory=list)  # hash / MTP layers: never pruned

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self.layer_experts)

    def to_json(self) -> dict:
        counts = sorted(set(self.layer_experts.values()))
        return {
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "moe_layers": self.moe_layers,
            "num_experts": counts[0] if len(counts) == 1 else {str(k): v for k, v in sorted(self.layer_experts.items())},
            "top_k": self.top_k,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "frozen_layers": self.frozen_layers,
        }


def checkpoint_structure(ckpt: Checkpoint) -> MoEStructure:
    fam = family_of(ckpt.config, str(ckpt.root / "config.json"))
    experts: dict[int, int] = {}
    for name, ref in ckpt.tensors.items():
        rel = classify(name, fam)
        if rel and rel.kind == "router" and name.endswith(".weight"):
            experts[rel.layer] = ref.shape[0]
    if not experts:
        raise BadInput(ckpt.root, f"no MoE router tensors found for model_type {fam.model_type!r}")
    cfg = ckpt.config
    where = str(ckpt.root / "config.json")
    num_experts(cfg, fam, where)  # present and sane, though the tensors say what each layer holds
    return MoEStructure(
        model_type=fam.model_type,
        num_layers=int(cfg.get("num_hidden_layers", max(experts) + 1)),
        layer_experts=experts,
        top_k=top_k(cfg, where),
        n_group=int(cfg.get("n_group") or 1),
        topk_group=int(cfg.get("topk_group") or 1),
    )


def router_weight_name(ckpt: Checkpoint, fam: Family, layer: int) -> str:
    for name in sorted(ckpt.tensors):
        rel = classify(name, fam)
        if rel and rel.layer == layer and rel.kind == "router" and name.endswith(".weight"):
            return name
    raise KeyError(layer)


def fingerprint(ckpt: Checkpoint, st: MoEStructure | None = None) -> str:
    """sha256 of the tensor table (names, dtypes, shapes) and the first router's bytes.

    Cheap on a 400 GB model, yet different for two random draws of the same architecture.
    """
    fam = family_of(ckpt.config)
    h = hashlib.sha256()
    table = sorted((n, r.dtype, list(r.shape)) for n, r in ckpt.tensors.items())
    h.update(json.dumps([ckpt.model_type, table], separators=(",", ":")).encode())
    first = min((st or checkpoint_structure(ckpt)).layer_experts)
    ref = ckpt.tensors[router_weight_name(ckpt, fam, first)]
    with open(ref.file, "rb") as f:
        f.seek(ref.start)
        h.update(f.read(ref.nbytes))
    return "sha256:" + h.hexdigest()


def check_plan(plan: Plan, st: MoEStructure, where: str, *, model_fingerprint: str | None = None,
               min_experts: int = 1) -> None:
    """Raise BadInput unless `plan` can be applied to a model of structure `st`."""
    pm = plan.model or {}
    if pm.get("model_type") not in (None, st.model_type):
        raise BadInput(where, f"plan is for model_type {pm['model_type']!r}, the model is {st.model_type!r}")
    have = st.to_json()
    for key, label in (("num_layers", "layers"), ("moe_layers", "MoE layers"), ("num_experts", "experts"),
                       ("top_k", "top_k")):
        if key in pm and pm[key] != have[key]:
            raise BadInput(where, f"plan is for a model with {label} {pm[key]}, the model has {have[key]}")
    if model_fingerprint and pm.get("fingerprint") and pm["fingerprint"] != model_fingerprint:
        raise BadInput(where, f"plan was made for another model (fingerprint {pm['fingerprint'][:19]}…, "
                              f"this model {model_fingerprint[:19]}…); pass --ignore-fingerprint to apply by structure")
    if not plan.layers:
        raise BadInput(where, "plan lists no layers")
    for layer, lp in sorted(plan.layers.items()):
        if layer in st.frozen_layers:
            raise BadInput(where, f"layer {layer} routes by a fixed table (hash/MTP) and cannot be pruned")
        if layer not in st.layer_experts:
            raise BadInput(where, f"layer {layer} is not an MoE layer of this model (MoE layers: {_span(st.moe_layers)})")
        n = st.layer_experts[layer]
        ids = set(lp.kept) | set(lp.pruned)
        out_of_range = sorted(e for e in ids if e >= n)
        if out_of_range:
            raise BadInput(where, f"layer {layer}: expert {out_of_range[0]} does not exist (layer has {n} experts)")
        if len(ids) != n:
            missing = sorted(set(range(n)) - ids)
            raise BadInput(where, f"layer {layer}: expert {missing[0]} is neither kept nor pruned")
        k = len(lp.kept)
        if k < max(st.top_k, min_experts, 1):
            raise BadInput(where, f"layer {layer}: keeps {k} experts, fewer than top_k={st.top_k}"
                                  + (f" / --min-experts={min_experts}" if min_experts > st.top_k else ""))
        if st.n_group > 1:
            _check_groups(layer, lp.kept, n, st, where)


def _check_groups(layer: int, kept: list[int], n: int, st: MoEStructure, where: str) -> None:
    size = n // st.n_group
    per_group = [sum(1 for e in kept if e // size == g) for g in range(st.n_group)]
    if len(set(per_group)) != 1:
        raise BadInput(where, f"layer {layer}: n_group={st.n_group} needs the same number kept in every group, plan keeps {per_group}")
    if per_group[0] < 2:
        raise BadInput(where, f"layer {layer}: keeps {per_group[0]} expert per group; group scoring needs at least 2")
    if st.topk_group * per_group[0] < st.top_k:
        raise BadInput(where, f"layer {layer}: topk_group={st.topk_group} x {per_group[0]} kept per group < top_k={st.top_k}")


def _span(ids: list[int]) -> str:
    if ids and ids == list(range(ids[0], ids[-1] + 1)) and len(ids) > 2:
        return f"{ids[0]}-{ids[-1]}"
    return ",".join(map(str, ids))
