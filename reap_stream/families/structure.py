"""The MoE structure of a model — from config + safetensors index, or from a GGUF's metadata and
tensors — and the fingerprint that ties a plan to one set of weights.

Structure (model type, MoE layers, experts per layer, top-k, groups, layers never pruned) is what
makes a plan fit a model in any format; the fingerprint additionally ties it to one set of weights.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import BadInput
from ..io.gguf import BLOCK_TENSOR, GGUFFile, VType
from ..io.reading import is_index
from ..io.safetensors import Checkpoint
from .table import (BY_GGUF_ARCH, MAX_LAYERS, Family, classify, config_int, dense_layers, expert_rows, family_of,
                    frozen_layers, group_keys, identity_rows, num_experts, text_config, top_k)

if TYPE_CHECKING:  # gguf_arch imports gguf-py: imported by the GGUF functions only, for start-up
    from .gguf_arch import Roles


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

    @property
    def prunable_layers(self) -> list[int]:
        return [i for i in self.moe_layers if i not in self.frozen_layers]

    def decoder_only(self) -> "MoEStructure":
        """The structure without NextN/MTP blocks past num_layers (as forms that drop them see it)."""
        keep = {L: n for L, n in self.layer_experts.items() if L < self.num_layers}
        return MoEStructure(self.model_type, self.num_layers, keep, self.top_k, self.n_group, self.topk_group,
                            [L for L in self.frozen_layers if L in keep])

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

    @classmethod
    def from_json(cls, model: object, where: str) -> "MoEStructure":
        """The structure recorded in a telemetry store's (or plan's) `model` block."""
        def fault(what: str) -> BadInput:
            return BadInput(where, f"telemetry 'model' attributes are incomplete or malformed ({what})")

        def count(key: str, value: object, low: int = 1, limit: int = 1 << 20) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= limit:
                raise fault(f"{key} is {value!r:.40}, not an integer in {low}..{limit:,}")
            return value

        if not isinstance(model, dict):
            raise fault("not an object")
        layers, counts = model.get("moe_layers"), model.get("num_experts")
        if not isinstance(layers, list) or not isinstance(model.get("model_type"), str):
            raise fault("no moe_layers list or model_type string")
        layers = [count("moe_layers", i, 0, 2 * MAX_LAYERS) for i in layers]
        if isinstance(counts, dict):
            if not all(is_index(k) for k in counts):
                raise fault("num_experts keys are not layer numbers")
            layer_experts = {int(k): count("num_experts", v) for k, v in counts.items()}
        else:
            layer_experts = {i: count("num_experts", counts) for i in layers}
        frozen = model.get("frozen_layers") or []
        if not isinstance(frozen, list):
            raise fault("frozen_layers is not a list")
        st = cls(model_type=model["model_type"], num_layers=count("num_layers", model.get("num_layers"), 1, MAX_LAYERS),
                 layer_experts=layer_experts, top_k=count("top_k", model.get("top_k")),
                 n_group=count("n_group", model.get("n_group") or 1),
                 topk_group=count("topk_group", model.get("topk_group") or 1),
                 frozen_layers=sorted({count("frozen_layers", i, 0, 2 * MAX_LAYERS) for i in frozen}))
        return checked_structure(st, where, {"layers": "num_layers", "top_k": "top_k", "groups": "n_group",
                                             "group_k": "topk_group"})


def checkpoint_structure(ckpt: Checkpoint, fam: Family | None = None) -> MoEStructure:
    where = str(ckpt.root / "config.json")
    fam = fam or family_of(ckpt.config, where)
    experts: dict[int, int] = {}
    identity = identity_rows(ckpt.config, fam)
    for name, ref in ckpt.tensors.items():
        rel = classify(name, fam)
        if rel and rel.kind == "router" and name.endswith(".weight"):
            experts[rel.layer] = ref.shape[0] - identity
    model_type = ckpt.config.get("model_type")
    if not experts:
        alias = "" if model_type == fam.model_type else f" (loaded as {fam.model_type})"
        raise BadInput(ckpt.root, f"no MoE router tensors found for model_type {model_type!r}{alias}: "
                                  f"the tensors are not this family's")
    cfg = text_config(ckpt.config, fam)
    configured = num_experts(ckpt.config, fam, where)
    _check_expert_axes(ckpt, fam, experts, identity)
    _check_selection_bias(ckpt, fam, experts)
    _check_counts(ckpt, fam, experts, configured, where)
    dense = sorted(set(dense_layers(ckpt.config, fam, where)) & set(experts))
    if dense:
        keys = ", ".join(k for k in fam.dense if cfg.get(k))
        raise BadInput(where, f"{keys} makes layer {dense[0]} dense, but the checkpoint holds a router for it")
    groups = _groups(cfg, fam, where)
    absent = "num_hidden_layers" not in cfg  # absent: as many as the routers say; null or "x": refused
    num_layers = config_int(cfg, "num_hidden_layers", where, default=max(experts) + 1 if absent else None,
                            limit=MAX_LAYERS)
    return checked_structure(MoEStructure(
        model_type=fam.model_type,
        num_layers=num_layers,
        layer_experts=experts,
        top_k=top_k(ckpt.config, where, fam),
        n_group=groups[0],
        topk_group=groups[1],
        frozen_layers=sorted(set(frozen_layers(ckpt.config, fam, where)) & set(experts)),
    ), where, {"layers": "num_hidden_layers", "top_k": fam.top_k_key, "groups": "n_group", "group_k": "topk_group"})


def checked_structure(st: MoEStructure, where: str, keys: dict[str, str]) -> MoEStructure:
    """`st` if its numbers fit together (they come from a file), else one line naming the key
    (`keys`: how this file spells layers, top_k, groups and group_k)."""
    beyond = [L for L in st.layer_experts if L >= 2 * MAX_LAYERS]
    if beyond:
        raise BadInput(where, f"MoE layer {beyond[0]} is past any real model's {2 * MAX_LAYERS:,} layers")
    for layer, n in sorted(st.layer_experts.items()):
        if n < 1:
            raise BadInput(where, f"layer {layer} has no experts")
        if st.top_k > n:
            raise BadInput(where, f"{keys['top_k']}={st.top_k} exceeds the {n} experts of layer {layer}")
        if n % st.n_group:
            raise BadInput(where, f"{keys['groups']}={st.n_group} does not divide the {n} experts of layer {layer}")
    if st.topk_group > st.n_group:
        raise BadInput(where, f"{keys['group_k']}={st.topk_group} exceeds {keys['groups']}={st.n_group}")
    return st


def _groups(cfg: dict, fam: Family, where: str) -> tuple[int, int]:
    """(n_group, topk_group) of a group-limited route, (1, 1) where routing has no groups."""
    keys = group_keys(fam)
    cond = fam.route.group_if
    if keys is None or (cond is not None and cfg.get(cond[0].rpartition(".")[2]) != cond[1]):
        return 1, 1
    return tuple(config_int(cfg, key, where, default=1) for key in keys)


def _check_expert_axes(ckpt: Checkpoint, fam: Family, experts: dict[int, int], identity: int) -> None:
    """Every expert-axis tensor of a layer holds as many experts as its router has rows (router
    tensors: plus the identity experts)."""
    for name, ref in sorted(ckpt.tensors.items()):
        rel = classify(name, fam)
        if rel is None or rel.layer not in experts:
            continue
        n = experts[rel.layer]
        if rel.kind == "per_expert" and rel.expert >= n:
            raise BadInput(ref.file, f"tensor {name!r} is expert {rel.expert}, but layer {rel.layer}'s router has {n} rows")
        rows = n + identity if rel.kind == "router" else n
        if rel.kind != "per_expert" and (not ref.shape or expert_rows(ref.shape) != rows):
            raise BadInput(ref.file, f"tensor {name!r} has shape {list(ref.shape)}; layer {rel.layer}'s router "
                                     f"has {n} experts, which its axis 0 must hold"
                                     + (f" (+ {identity} identity experts)" if rows != n else ""))


def _check_selection_bias(ckpt: Checkpoint, fam: Family, experts: dict[int, int]) -> None:
    """A router that selects with a bias has one in every MoE layer (in either layout's name): a
    checkpoint without is another family's (or an alias over the wrong tensors)."""
    route = fam.route
    if route.bias is None or route.bias_optional:
        return
    leaf = route.bias.rpartition(".")[2]
    have = {rel.layer for n in ckpt.tensors if n.endswith("." + leaf) and (rel := classify(n, fam)) is not None}
    missing = sorted(set(experts) - have)
    if missing:
        raise BadInput(ckpt.root, f"layer {missing[0]} has no {leaf} tensor, which a {fam.model_type} router "
                                  f"selects with: the tensors are not this family's")


def _check_counts(ckpt: Checkpoint, fam: Family, experts: dict[int, int], configured: int, where: str) -> None:
    """The config's expert count is every layer's (a reap-stream output: its record says each)."""
    record = ckpt.config.get("reap_stream")
    layer_record = (record or {}).get("layer_experts") if isinstance(record, dict) else None
    try:
        want = {int(k): int(v) for k, v in layer_record.items()} if isinstance(layer_record, dict) else {}
    except (TypeError, ValueError):
        raise BadInput(where, f"reap_stream.layer_experts is not a map of layer -> expert count "
                              f"({layer_record!r:.80})") from None
    for layer, n in sorted(experts.items()):
        expected = want.get(layer, configured)
        if n != expected:
            source = f"reap_stream.layer_experts[{layer}]" if layer in want else fam.experts_key
            raise BadInput(where, f"{source} is {expected} but layer {layer} holds {n} experts "
                                  f"(its router has {n} rows)")


def router_weight_name(ckpt: Checkpoint, fam: Family, layer: int) -> str:
    for name in sorted(ckpt.tensors):
        rel = classify(name, fam)
        if rel and rel.layer == layer and rel.kind == "router" and name.endswith(".weight"):
            return name
    raise KeyError(layer)


GGUF_FINGERPRINT = "gguf-sha256:"


def same_kind(a: str, b: str) -> bool:
    """Fingerprints compare only within one form: a safetensors checkpoint's bytes differ from its
    GGUF's, so across forms a plan matches by structure."""
    return a.startswith(GGUF_FINGERPRINT) == b.startswith(GGUF_FINGERPRINT)


def fingerprint(ckpt: Checkpoint, st: MoEStructure, fam: Family) -> str:
    """sha256 of the tensor table (names, dtypes, shapes) and the first router's bytes.

    Cheap on a 400 GB model, yet different for two random draws of the same architecture.
    """
    h = hashlib.sha256()
    table = sorted((n, r.dtype, list(r.shape)) for n, r in ckpt.tensors.items())
    h.update(json.dumps([ckpt.model_type, table], separators=(",", ":")).encode())
    ref = ckpt.tensors[router_weight_name(ckpt, fam, min(st.layer_experts))]
    with open(ref.file, "rb") as f:
        f.seek(ref.start)
        h.update(f.read(ref.nbytes))
    return "sha256:" + h.hexdigest()


# ------------------------------------------------------------------ GGUF


def gguf_roles(fam: Family, arch: str, where: str | Path) -> Roles:
    """The expert-axis roles of an architecture's tensors (gguf-py's tables + the row's extras)."""
    from .gguf_arch import Roles

    return Roles(arch, fam.gguf_extra_expert_tensors, str(where))


_UINTS = (VType.UINT8, VType.UINT16, VType.UINT32, VType.UINT64, VType.INT32, VType.INT64)


def _uint_kv(g: GGUFFile, key: str, *, required: bool = True, limit: int = 1 << 20) -> int | None:
    kv = g.kvs.get(key)
    if kv is None:
        if required:
            raise BadInput(g.path, f"metadata key {key!r} is missing")
        return None
    if kv.vtype not in _UINTS or not 0 <= kv.value <= limit:
        raise BadInput(g.path, f"metadata {key!r} must be an integer in 0..{limit:,}, got {kv.value!r:.80}")
    return int(kv.value)


def gguf_top_k(g: GGUFFile, arch: str, moe_layers: list[int]) -> int:
    """`{arch}.expert_used_count`: one value, or one per layer (llama.cpp reads either); the
    largest over the MoE layers bounds what a prune may keep."""
    key = f"{arch}.expert_used_count"
    kv = g.kvs.get(key)
    if kv is not None and kv.vtype == VType.ARRAY:
        values = kv.value
        if not isinstance(values, list) or not all(isinstance(v, int) and v >= 0 for v in values) \
                or len(values) <= max(moe_layers):
            raise BadInput(g.path, f"metadata {key!r} must be a non-negative integer or one per layer")
        return max(values[L] for L in moe_layers)
    return _uint_kv(g, key)


def gguf_family(g: GGUFFile) -> tuple[str, Family]:
    """(architecture, family row) of a GGUF's first part."""
    from .gguf_arch import known_arch

    arch_kv = g.kvs.get("general.architecture")
    if arch_kv is None or arch_kv.vtype != VType.STRING:
        raise BadInput(g.path, "metadata 'general.architecture' is missing or not a string")
    arch = arch_kv.value
    fam = BY_GGUF_ARCH.get(arch)
    if fam is None:
        known = " (gguf-py knows it, but no family row names it)" if known_arch(arch) else ""
        raise BadInput(g.path, f"architecture {arch!r} is not a supported MoE architecture{known} "
                               f"(supported: {', '.join(sorted(BY_GGUF_ARCH))})")
    return arch, fam


def gguf_structure(parts: list[GGUFFile], arch: str, fam: Family) -> tuple[MoEStructure, list[int]]:
    """(structure, hash-routed layers) of a GGUF model from its metadata and tensors.

    `num_layers` counts the decoder blocks (`block_count` less `nextn_predict_layers`), as a
    config's num_hidden_layers does; NextN/MTP blocks after them are MoE layers a plan leaves whole."""
    from .gguf_arch import GROUP_KEYS, Role, arch_expert_tensors

    g = parts[0]
    block_count = _uint_kv(g, f"{arch}.block_count", limit=MAX_LAYERS)
    roles = gguf_roles(fam, arch, g.path)
    group_key = GROUP_KEYS.get(arch)
    group = _uint_kv(g, f"{arch}.{group_key}", required=False) if group_key else None
    experts: dict[int, int] = {}
    chunks: dict[int, tuple[str, int]] = {}
    hash_layers = set()
    for part in parts:
        roles.where = str(part.path)
        for t in part.tensors:
            m = BLOCK_TENSOR.match(t.name)
            if not m:
                continue
            layer, suffix = int(m.group(1)), m.group(2)
            if layer >= block_count:
                raise BadInput(part.path, f"tensor {t.name!r} is past {arch}.block_count={block_count}")
            if suffix == fam.gguf_hash_tensor:
                hash_layers.add(layer)
            role = roles.of(suffix)
            if role is Role.CHUNK_EXPERTS:
                chunks.setdefault(layer, (t.name, t.ne[-1]))
            elif role is not None:
                n = t.ne[-1]
                if experts.setdefault(layer, n) != n:
                    raise BadInput(part.path, f"layer {layer}: {t.name!r} holds {n} experts, other expert tensors "
                                              f"{experts[layer]}")
    if not experts:
        expected = ", ".join(f"blk.N.{b}" for b, r in arch_expert_tensors(arch).items() if r is Role.EXPERTS)
        raise BadInput(g.path, f"no MoE expert tensors found for architecture {arch!r}"
                               + (f" (gguf-py lists {expected})" if expected else ""))
    expert_count = _uint_kv(g, f"{arch}.expert_count")
    wrong = {L: n for L, n in experts.items() if n != expert_count}
    if wrong:
        L = min(wrong)
        raise BadInput(g.path, f"{arch}.expert_count is {expert_count} but layer {L} holds {wrong[L]} experts")
    for L, (name, n) in sorted(chunks.items()):
        if not group or n * group != experts.get(L):
            raise BadInput(g.path, f"{name!r} holds {n} chunk experts: {arch}.{group_key}={group} does not divide "
                                   f"layer {L}'s {experts.get(L)} experts into that many groups")
    nextn = _uint_kv(g, f"{arch}.nextn_predict_layers", required=False, limit=block_count) or 0
    if nextn >= block_count:
        raise BadInput(g.path, f"{arch}.nextn_predict_layers={nextn} leaves no decoder block of {block_count}")
    moe = sorted(experts)
    # only MoE layers can be frozen: a dense NextN block has no experts to protect
    frozen = sorted((hash_layers | set(range(block_count - nextn, block_count))) & set(experts))
    st = checked_structure(MoEStructure(
        model_type=fam.model_type,
        num_layers=block_count - nextn,
        layer_experts={L: experts[L] for L in moe},
        top_k=gguf_top_k(g, arch, moe),
        n_group=_uint_kv(g, f"{arch}.expert_group_count", required=False) or 1,
        topk_group=_uint_kv(g, f"{arch}.expert_group_used_count", required=False) or 1,
        frozen_layers=frozen,
    ), str(g.path), {k: f"{arch}.{v}" for k, v in (("layers", "block_count"), ("top_k", "expert_used_count"),
                                                   ("groups", "expert_group_count"),
                                                   ("group_k", "expert_group_used_count"))})
    return st, sorted(hash_layers)


def gguf_fingerprint(parts: list[GGUFFile], arch: str, st: MoEStructure, fam: Family) -> str:
    """sha256 of the architecture, the tensor names and shapes and the first router's float32 values.

    Types are left out on purpose: llama.cpp's converter writes routers in F32 and llama-quantize
    never quantises them, so every quantisation of one model (Q8_0, Q4_K_M, ...) has the same
    fingerprint, and a plan made on one applies to the others; two different models do not."""
    from ..io.gguf_read import read_tensor
    from .gguf_arch import Role

    roles = gguf_roles(fam, arch, parts[0].path)
    tensors = [t for p in parts for t in p.tensors]
    h = hashlib.sha256()
    h.update(json.dumps([arch, sorted((t.name, list(t.ne)) for t in tensors)], separators=(",", ":")).encode())
    routers = [t for t in tensors if (m := BLOCK_TENSOR.match(t.name)) and int(m.group(1)) == min(st.layer_experts)
               and m.group(2).endswith(".weight") and roles.of(m.group(2)) is Role.ROUTER]
    if routers:
        h.update(read_tensor(routers[0]).astype("<f4").tobytes())
    return GGUF_FINGERPRINT + h.hexdigest()
