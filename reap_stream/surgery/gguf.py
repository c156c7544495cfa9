"""Apply a pruning plan to a GGUF model by copying byte ranges (GGUF recompaction).

Every expert-axis tensor of a GGUF MoE layer has the expert as its outermost dimension (ne[-1]:
ne2 of `ffn_*_exps.weight`, ne1 of `ffn_gate_inp.weight` and of 2-D `*_exps.bias`, ne0 of
`exp_probs_b.bias`), and quantisation blocks run along ne0, so for every ggml type expert e is
the contiguous range [e*stride, (e+1)*stride) of the tensor's data. Recompaction is therefore a
copy of the kept experts' ranges in ascending original order, through one fixed buffer. The whole
output header (metadata, tensor infos, consecutive aligned offsets) is planned before any tensor
byte is written; output goes to a temporary name and is renamed when complete.

The plan is matched to the file by structure (architecture, layer count, experts per layer), so a
plan made from the MLX or HF form of the same model applies to its GGUF.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .. import __version__
from ..errors import BadInput, os_error
from ..families.model import Model
from ..families.gguf_arch import GROUP_KEYS, Role, Roles, check_prunable
from ..families.structure import gguf_roles, same_kind
from ..families.table import FAMILIES
from ..io.files import (MANIFEST_HASHES, Flusher, check_manifest_hash, check_space, copy_flushed, flushed_writes,
                        hash_ranges, new_hash, write_all, write_text_atomic)
from ..io.lock import exclusive, test_pause
from ..io.reading import resolved
from ..io.gguf import BLOCK_TENSOR, KV, SPLIT_PATTERN, GGUFFile, VType, align, split_name
from ..io.gguf_write import OutTensor, encode_header, encode_kv, plan_offsets
from ..planning.plan import Plan, check_plan, kept_runs

# reap.layer.policy values of ds4-compact-v1 (docs/gguf.md); POLICY_MOE_DISABLED is reserved by
# the layout and never written by this tool
POLICY_NONE, POLICY_HASH_PRESERVED, POLICY_ROUTER_MASK_PRUNED, POLICY_MOE_DISABLED = 0, 1, 2, 3
GGUF_MANIFEST_SUFFIX = ".reap.json"
GGUF_MANIFEST_FORMAT = "reap-stream-gguf-manifest"


def _check_same_model(plan: Plan, gm: Model, where: str) -> None:
    """Plans from another form of the model carry its structure: say exactly what differs."""
    pm = plan.model or {}
    st, arch = gm.structure, gm.gguf_arch
    mt = pm.get("model_type")
    if mt is not None and mt != st.model_type:
        fam = FAMILIES.get(mt)
        other = f" (GGUF architecture {fam.gguf_arch!r})" if fam and fam.gguf_arch else ""
        raise BadInput(where, f"plan is for model_type {mt!r}{other}; {gm.path.name} is architecture {arch!r} ({st.model_type})")
    if "num_layers" in pm and pm["num_layers"] != st.num_layers:
        blocks = _block_count(gm)
        extra = f" of which {blocks - st.num_layers} NextN" if blocks > st.num_layers else ""
        raise BadInput(where, f"plan is for {pm['num_layers']} layers; {gm.path.name} has {arch}.block_count={blocks}"
                              f"{extra}")
    ne = pm.get("num_experts")
    if ne is not None:
        want = ({int(k): v for k, v in ne.items()} if isinstance(ne, dict)
                else {L: ne for L in st.layer_experts})
        for L, n in sorted(want.items()):
            have = st.layer_experts.get(L)
            if have is not None and have != n:
                raise BadInput(where, f"plan is for {n} experts in layer {L}; {gm.path.name} holds {have} there")
    if "top_k" in pm and pm["top_k"] != st.top_k:
        raise BadInput(where, f"plan is for top_k={pm['top_k']}; {gm.path.name} has {arch}.expert_used_count={st.top_k}")
    moe = pm.get("moe_layers")
    forms = (st.moe_layers, st.decoder_only().moe_layers, st.prunable_layers)
    if moe is not None and sorted(moe) not in forms:
        raise BadInput(where, f"plan is for MoE layers {sorted(moe)}; {gm.path.name} has MoE layers {st.moe_layers}")


# ---------------------------------------------------------------- layout

@dataclass
class OutPart:
    path: Path
    source: GGUFFile
    header: bytes
    tensors: list[OutTensor]

    @property
    def size(self) -> int:
        last = self.tensors[-1] if self.tensors else None
        return len(self.header) + (align(last.offset + last.nbytes, self.source.alignment) if last else 0)


def _out_tensors(part: GGUFFile, roles: Roles, kept: dict[int, list[int]], group: int | None) -> list[OutTensor]:
    planned = []
    roles.where = str(part.path)
    for t in part.tensors:
        m = BLOCK_TENSOR.match(t.name)
        ids = kept.get(int(m.group(1))) if m else None
        role = roles.of(m.group(2)) if ids is not None else None
        if role is Role.CHUNK_EXPERTS:   # one slice per group of `group` experts (whole groups kept)
            ids = sorted({e // group for e in ids})
        if role is None or len(ids) == t.ne[-1]:
            planned.append((t.name, t.ne, t.ggml_type, t.nbytes, ((t.start, t.nbytes),), False))
            continue
        stride = t.outer_stride
        pieces = tuple((t.start + first * stride, n * stride) for first, n in kept_runs(ids))
        planned.append((t.name, t.ne[:-1] + (len(ids),), t.ggml_type, len(ids) * stride, pieces, True))
    offsets = plan_offsets([p[3] for p in planned], part.alignment)
    return [OutTensor(name, ne, typ, off, nbytes, pieces, sliced)
            for (name, ne, typ, nbytes, pieces, sliced), off in zip(planned, offsets)]


def _metadata(part: GGUFFile, edits: dict[str, bytes], additions: list[bytes]) -> list[bytes]:
    """Raw entries in file order, edited ones re-encoded in place, additions at the end."""
    return [edits.get(kv.key, kv.raw) for kv in part.kvs.values()] + additions


def out_paths(out: Path, n_parts: int) -> list[Path]:
    """The file(s) apply writes for `out`: one, or the parts of a split named like llama.cpp's."""
    if n_parts == 1:
        return [out]
    m = SPLIT_PATTERN.match(out.name)
    prefix = m.group("prefix") if m else (out.name[:-5] if out.name.endswith(".gguf") else out.name)
    return [out.with_name(split_name(prefix, i + 1, n_parts)) for i in range(n_parts)]


def _block_count(gm: Model) -> int:
    """`{arch}.block_count`: decoder blocks and NextN blocks."""
    return int(gm.gguf_parts[0].get(f"{gm.gguf_arch}.block_count"))


def _layer_policy(gm: Model, after: dict[int, int]) -> tuple[list[int], list[int], list[int]]:
    st = gm.structure
    policy, count, keep = [], [], []
    for L in range(_block_count(gm)):
        n = st.layer_experts.get(L, 0)
        k = after.get(L, 0)
        if L in gm.hash_layers:
            policy.append(POLICY_HASH_PRESERVED)
        elif k < n:
            policy.append(POLICY_ROUTER_MASK_PRUNED)
        else:
            policy.append(POLICY_NONE)
        count.append(n)
        keep.append(k)
    return policy, count, keep


def _mtp_kept(gm: Model, kept: dict[int, list[int]]) -> dict[int, list[int]]:
    """NextN/MTP blocks under one `expert_count`: llama.cpp needs them cut to the same count, and
    calibration never runs them (the decoder's output does not depend on them). They keep the
    experts the last pruned decoder layer keeps (docs/gguf.md)."""
    st = gm.structure
    mtp = [L for L in st.frozen_layers if L >= st.num_layers and L not in gm.hash_layers]
    pruned = [L for L, ids in kept.items() if len(ids) < st.layer_experts[L]]
    if not mtp or not pruned:
        return {}
    return {L: kept[max(pruned)] for L in mtp}


def plan_layout(gm: Model, plan: Plan, out: Path, where: str) -> tuple[list[OutPart], dict]:
    """Every output header and tensor's source ranges, before any byte is written."""
    st, arch = gm.structure, gm.gguf_arch
    kept = plan.kept_map()
    first = gm.gguf_parts[0]
    group_key = GROUP_KEYS.get(arch)
    group = first.get(f"{arch}.{group_key}") if group_key else None
    check_prunable(arch, max(st.layer_experts.values()), kept, group, where)
    edits: dict[str, bytes] = {}
    additions: dict[str, bytes] = {}
    mtp: dict[int, list[int]] = {}
    if gm.family.gguf_compact_layout:
        layout = gm.family.gguf_compact_layout
        after = {L: len(kept.get(L, range(n))) for L, n in st.layer_experts.items()}
        policy, count, keep = _layer_policy(gm, after)
        additions = {
            "reap.enabled": encode_kv("reap.enabled", VType.BOOL, True),
            "reap.layout": encode_kv("reap.layout", VType.STRING, layout),
            "reap.layer.policy": encode_kv("reap.layer.policy", VType.ARRAY, policy, VType.UINT32),
            "reap.layer.expert_count": encode_kv("reap.layer.expert_count", VType.ARRAY, count, VType.UINT32),
            "reap.layer.keep_count": encode_kv("reap.layer.keep_count", VType.ARRAY, keep, VType.UINT32),
        }
    else:
        mtp = _mtp_kept(gm, kept)
        kept = {**kept, **mtp}
        after = {L: len(kept.get(L, range(n))) for L, n in st.layer_experts.items()}
        if len(set(after.values())) != 1:
            counts = sorted(set(after.values()))
            frozen = f" (layers {st.frozen_layers} are never pruned)" if st.frozen_layers else ""
            raise BadInput(where, f"plan keeps {counts[0]}..{counts[-1]} experts in different layers{frozen}; "
                                  f"llama.cpp's {arch!r} loader reads one {arch}.expert_count for all layers, so "
                                  f"only uniform plans apply to this GGUF (ds4-compact-v1 exists for deepseek4 only)")
        layout = "uniform"
        key = f"{arch}.expert_count"
        kv: KV = first.kvs[key]
        edits[key] = encode_kv(key, kv.vtype, next(iter(after.values())))
    counts = sorted(set(after.values()))
    parts = []
    roles = gguf_roles(gm.family, arch, first.path)
    for i, (src, path) in enumerate(zip(gm.gguf_parts, out_paths(out, len(gm.gguf_parts)))):
        tensors = _out_tensors(src, roles, kept, group)
        kv_raw = _metadata(src, edits, list(additions.values()) if i == 0 else [])
        parts.append(OutPart(path, src, encode_header(src.version, kv_raw, tensors, src.alignment), tensors))
    info = {"layout": layout,
            "experts_after": counts[0] if len(counts) == 1 else {str(L): n for L, n in sorted(after.items())},
            "metadata_changed": sorted(edits) + list(additions),
            "mtp_layers": {str(L): "kept the experts of the last pruned layer" for L in sorted(mtp)}}
    return parts, info


# ---------------------------------------------------------------- writing

def manifest_path(first_part: Path) -> Path:
    """The sidecar holding the manifest hash (io.files.MANIFEST_HASHES) and size of every part: beside the first part, named after it.
    A sidecar, not a metadata entry: a file cannot hold its own checksum, and the GGUF bytes stay
    exactly what llama.cpp loads (no key or tensor it does not know)."""
    return first_part.with_name(first_part.name + GGUF_MANIFEST_SUFFIX)


def _digest(part: OutPart, buffer_bytes: int, algo: str) -> str:
    """The `algo` digest of what `_write_part` writes, from the source ranges (on a second thread,
    beside the copy)."""
    sha = new_hash(algo)
    sha.update(part.header)
    buf = memoryview(bytearray(buffer_bytes))
    with open(part.source.path, "rb", buffering=0) as src:
        for t in part.tensors:
            hash_ranges(sha, src.fileno(), [(start, start + length) for start, length in t.pieces], buf,
                        part.source.path)
            sha.update(bytes(-t.nbytes % part.source.alignment))
    return sha.hexdigest()


def _write_part(part: OutPart, flusher: Flusher, buf: memoryview, bar: tqdm) -> None:
    """Write `part` into the file `flusher` holds, put on disk behind the copy."""
    align = part.source.alignment
    with open(part.source.path, "rb", buffering=0) as src:
        write_all(flusher.fd, part.header)
        for t in part.tensors:
            for start, length in t.pieces:
                copy_flushed(src.fileno(), flusher, start, start + length, buf, part.source.path, bar.update)
            write_all(flusher.fd, bytes(-t.nbytes % align))


def apply_gguf(gm: Model, plan: Plan, out: Path, *, overwrite: bool, dry_run: bool,
               buffer_bytes: int = 8 << 20, plan_where: str | Path = "plan", progress: bool = True,
               ignore_fingerprint: bool = False, manifest_hash: str = MANIFEST_HASHES[0]) -> dict:
    """Write `out` (or its split parts): the GGUF model `gm` with the plan's pruned experts removed.

    Returns a JSON-able summary. A plan made on a GGUF must carry this model's GGUF fingerprint
    (any quantisation of the same weights has it); a plan made on another form of the model is
    matched by structure. `progress=False` hides the byte bar (apply --quiet / --json).
    """
    out, where = Path(out), str(plan_where)
    model = gm.path
    _check_same_model(plan, gm, where)
    check_plan(plan, gm.structure, where, model_fingerprint=None if ignore_fingerprint else gm.fingerprint)
    planned = (plan.model or {}).get("fingerprint")
    parts, info = plan_layout(gm, plan, out, where)

    sources = {resolved(p.path) for p in gm.gguf_parts}
    for p in parts:
        if resolved(p.path) in sources:
            raise BadInput(p.path, "output would overwrite the source model")
        if not p.path.parent.is_dir():
            raise BadInput(p.path, "output directory does not exist")
        if p.path.exists() and not overwrite:
            raise BadInput(p.path, "output exists; pass --overwrite to replace it")
    if buffer_bytes < 4096:
        raise BadInput("--buffer-size", f"must be at least 4096 bytes (got {buffer_bytes})")
    check_manifest_hash(manifest_hash)

    st = gm.structure
    summary = {
        "format": "gguf",
        "model": str(model),
        "out": [str(p.path) for p in parts],
        "arch": gm.gguf_arch,
        "model_type": st.model_type,
        "layout": info["layout"],
        "method": plan.method,
        "ratio": plan.ratio,
        "dry_run": dry_run,
        "layers_pruned": sorted(L for L, lp in plan.layers.items() if lp.pruned),
        "frozen_layers": st.frozen_layers,
        "experts_before": st.to_json()["num_experts"],
        "experts_after": info["experts_after"],
        "kept_per_layer": {str(L): len(lp.kept) for L, lp in sorted(plan.layers.items())},
        "metadata_changed": info["metadata_changed"],
        "mtp_layers": info["mtp_layers"],
        "tensors": sum(len(p.tensors) for p in parts),
        "tensors_sliced": sum(t.sliced for p in parts for t in p.tensors),
        "bytes_in": sum(g.size for g in gm.gguf_parts),
        "bytes_out": sum(p.size for p in parts),
        "fingerprint": ("compared" if isinstance(planned, str) and same_kind(planned, gm.fingerprint)
                        and not ignore_fingerprint else
                        "not compared: matched by structure (architecture, layer count, experts per layer)"),
    }
    if dry_run:
        return summary

    with exclusive(out):
        for p in parts:  # again, now that no other run can be writing them
            if os.path.lexists(p.path) and not overwrite:
                raise BadInput(p.path, "output exists; pass --overwrite to replace it")
            if os.path.lexists(p.path) and not os.path.isfile(p.path):
                raise BadInput(p.path, "output exists and is not a regular file")
        needed = summary["bytes_out"] + (1 << 16)
        check_space(out.parent, needed, "output")
        test_pause("writing")
        try:
            summary["files"] = _write_parts(parts, buffer_bytes, model.name, progress, manifest_hash)
        except OSError as e:
            ours = e.filename is None or Path(e.filename).name.endswith(".partial")  # a temporary: name the output
            raise os_error(e, out if ours else e.filename, needed=needed, doing="cannot write the output") from None
    return summary


def _write_parts(parts: list[OutPart], buffer_bytes: int, name: str, progress: bool, algo: str) -> dict:
    """Every part under a temporary name, then renamed into place; the sidecar manifest last. An
    overwritten output loses its old manifest first, so a run dying among the renames leaves
    parts that `verify` reports as unchecked, never a set that passes."""
    buf = memoryview(bytearray(buffer_bytes))
    tmps = [p.path.with_name(f".{p.path.name}.partial") for p in parts]
    total = sum(t.nbytes for p in parts for t in p.tensors)
    files = {}
    try:
        with flushed_writes() as create, ThreadPoolExecutor(max_workers=1) as pool, \
                tqdm(total=total, unit="B", unit_scale=True, desc=f"apply {name}",
                     disable=None if progress else True) as bar:
            for p, tmp in zip(parts, tmps):
                digest = pool.submit(_digest, p, len(buf), algo)
                flusher = create(tmp)
                _write_part(p, flusher, buf, bar)
                flusher.finish()   # its fsync overlaps the next part's copy
                files[p.path.name] = {algo: digest.result(), "size": os.stat(tmp).st_size}
        sidecar = manifest_path(parts[0].path)
        if os.path.lexists(sidecar):
            os.unlink(sidecar)
        # the first part is what loaders open: it appears last, when every other part is in place
        for p, tmp in reversed(list(zip(parts, tmps))):
            os.replace(tmp, p.path)
        write_text_atomic(sidecar, json.dumps({"format": GGUF_MANIFEST_FORMAT, "tool_version": __version__,
                                               "hash": algo, "files": files}, indent=2, sort_keys=True) + "\n")
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
    return files
