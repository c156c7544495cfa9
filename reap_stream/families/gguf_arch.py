"""What a llama.cpp architecture's GGUF holds in its MoE layers, derived from gguf-py's own tables.

gguf-py lists, per architecture, the tensors its converter may write (`MODEL_TENSORS[arch]`) and
the name of each (`TENSOR_NAMES`). A tensor has an expert axis when its name is a routed-expert
stack (`ffn_{gate,up,down,gate_up}_exps`), the router (`ffn_gate_inp`), the selection bias
(`exp_probs_b`) or a chunk-expert stack (`ffn_*_chexps`, one slice per group of experts). In every
case the expert (or group) is the outermost ggml dimension, so one expert is one contiguous byte
range for every ggml type. Shared experts (`*_shexp`, `ffn_gate_inp_shexp`), latent projections and
everything else carry no expert axis.

Two kinds of names need more than the tables:
- look-alikes: `ffn_norm_exps` (Arctic's norm in front of the MoE block, shape {n_embd}) is named
  like a stack but llama.cpp multiplies by it; it has no expert axis;
- leaves: a stack's `.weight`, `.bias`, `.scale` and `.input_scale` all have the expert outermost
  (llama.cpp loads the last two for every architecture), the router's `.weight` and `.bias` do,
  but its `.scale` (Gemma-4's {n_embd} input scale) does not.

Some llama.cpp behaviour depends on the expert count itself; pruning must not change it
(`check_prunable`). A GGUF that names an architecture gguf-py does not know is read with the
names every architecture shares.
"""
from __future__ import annotations

from enum import Enum
from functools import lru_cache
from types import MappingProxyType

from gguf.constants import MODEL_ARCH_NAMES, MODEL_TENSOR, MODEL_TENSORS, TENSOR_NAMES

from ..errors import BadInput


class Role(str, Enum):
    EXPERTS = "experts"                 # routed expert stack, outermost axis = expert
    ROUTER = "router"                   # router rows (and bias), outermost axis = expert
    SELECTION_BIAS = "selection_bias"   # bias added for expert selection only
    CHUNK_EXPERTS = "chunk_experts"     # one slice per group of consecutive experts (GroveMoE)


# named like an expert stack, no expert axis: llama.cpp multiplies the block input by it
LOOK_ALIKES = frozenset({MODEL_TENSOR.FFN_NORM_EXP})

# which leaves of a tensor (name after the last ".") carry its expert axis; None: a bare name
_LEAVES = {
    Role.EXPERTS: ("weight", "bias", "scale", "input_scale"),
    Role.CHUNK_EXPERTS: ("weight", "bias", "scale", "input_scale"),
    Role.ROUTER: ("weight", "bias"),
    Role.SELECTION_BIAS: ("bias", None),
}

# llama.cpp behaviour switched by the expert count (its per-architecture loaders): count -> why
# any other count changes the model
COUNT_SWITCHES = MappingProxyType({
    "llama4": {128: "llama.cpp turns Llama-4's QK-norm off only for exactly 128 experts (it takes that count "
                    "to mean Maverick), so a pruned Maverick would run as a different model"},
})
# metadata key giving the size of the expert groups that share one chunk expert
GROUP_KEYS = MappingProxyType({"grovemoe": "experts_per_group"})


def _role(t: MODEL_TENSOR) -> Role | None:
    name = TENSOR_NAMES.get(t, "")
    if not name.startswith("blk.{bid}.") or t in LOOK_ALIKES:
        return None
    if t is MODEL_TENSOR.FFN_GATE_INP:
        return Role.ROUTER
    if t is MODEL_TENSOR.FFN_EXP_PROBS_B:
        return Role.SELECTION_BIAS
    if name.endswith("_chexps"):
        return Role.CHUNK_EXPERTS
    if name.endswith("_exps"):
        return Role.EXPERTS
    return None


def _base(t: MODEL_TENSOR) -> str:
    return TENSOR_NAMES[t][len("blk.{bid}."):]


@lru_cache(maxsize=None)
def _global_roles() -> MappingProxyType:
    """base name -> role, over every tensor name gguf-py knows."""
    return MappingProxyType({_base(t): r for t in MODEL_TENSOR if (r := _role(t)) is not None})


LOOK_ALIKE_BASES = frozenset(_base(t) for t in LOOK_ALIKES)


def known_arch(arch: str) -> bool:
    return arch in MODEL_ARCH_NAMES.values()


def arch_enum(arch: str):
    return next(a for a, n in MODEL_ARCH_NAMES.items() if n == arch)


@lru_cache(maxsize=None)
def arch_expert_tensors(arch: str) -> MappingProxyType:
    """base name -> role of the expert-axis tensors gguf-py lists for `arch` (empty when gguf-py
    does not know the architecture)."""
    if not known_arch(arch):
        return MappingProxyType({})
    return MappingProxyType({_base(t): r for t in MODEL_TENSORS[arch_enum(arch)] if (r := _role(t)) is not None})


def moe_archs() -> list[str]:
    """Every architecture gguf-py lists with routed-expert tensors, in gguf-py's order."""
    return [MODEL_ARCH_NAMES[a] for a in MODEL_TENSORS
            if any(r in (Role.EXPERTS, Role.CHUNK_EXPERTS) for r in arch_expert_tensors(MODEL_ARCH_NAMES[a]).values())]


class Roles:
    """Classifies `blk.N.<suffix>` tensor suffixes of one architecture by their expert axis.

    Names are gguf-py's, which every architecture shares: besides the ones gguf-py lists for the
    architecture, any other is accepted where it appears (a newer converter may write a fused
    `ffn_gate_up_exps` where gguf-py lists gate and up). `extra` names (a family row's, for
    tensors gguf-py does not list at all) are routed-expert tensors."""

    def __init__(self, arch: str, extra: tuple[str, ...] = (), where: str = "model"):
        self.arch, self.where = arch, where
        self.bases = _global_roles()
        self.extra = frozenset(extra)

    def of(self, suffix: str) -> Role | None:
        """The role of a tensor suffix ("ffn_up_exps.weight"), None when it has no expert axis.

        Raises BadInput for a name that looks like an expert tensor but is not known, rather than
        guessing its expert axis."""
        if suffix in self.extra:
            return Role.EXPERTS
        base, dot, leaf = suffix.rpartition(".")
        if not dot:
            base, leaf = suffix, None
        role = self.bases.get(base)
        if role is not None:
            return role if leaf in _LEAVES[role] else self._unknown(suffix, role, leaf)
        if ("_exps" in base or "_chexps" in base) and base not in LOOK_ALIKE_BASES:
            raise BadInput(self.where, f"tensor suffix {suffix!r} looks like an expert tensor but gguf-py does not "
                                       f"list it for {self.arch!r}; refusing to guess its expert axis")
        return None

    def _unknown(self, suffix: str, role: Role, leaf: str | None) -> None:
        if role is Role.ROUTER and leaf == "scale":
            return None   # Gemma-4's router input scale, {n_embd}
        raise BadInput(self.where, f"tensor suffix {suffix!r}: {leaf!r} is not a known part of a {role.value} "
                                   f"tensor; refusing to guess its expert axis")


def check_prunable(arch: str, experts: int, kept: dict[int, list[int]], group_size: int | None, where: str) -> None:
    """Refuse, naming the architecture and the reason, a prune llama.cpp cannot express."""
    counts = sorted({len(ids) for ids in kept.values()})
    switch = COUNT_SWITCHES.get(arch, {})
    if experts in switch and counts and counts != [experts]:
        raise BadInput(where, f"{arch}: cannot prune a {experts}-expert model: {switch[experts]}")
    if group_size:
        for layer, kept_ids in sorted(kept.items()):
            ids = set(kept_ids)
            groups = {e // group_size for e in ids}
            whole = all(g * group_size + i in ids for g in groups for i in range(group_size))
            if not whole:
                split = min(g for g in groups if any(g * group_size + i not in ids for i in range(group_size)))
                raise BadInput(where, f"{arch}: layer {layer} keeps part of expert group {split} (experts "
                                      f"{split * group_size}..{split * group_size + group_size - 1}); llama.cpp maps "
                                      f"expert i to chunk expert i/{group_size} ({arch}.{GROUP_KEYS[arch]}), so "
                                      f"only whole groups can be pruned")
