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

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .. import __version__
from ..errors import BadInput, os_error
from ..families.model import Model
from ..families.structure import gguf_expert_tensors
from ..families.table import FAMILIES
from ..io.files import check_space, copy_range, write_all, write_text_atomic
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
        raise BadInput(where, f"plan is for {pm['num_layers']} layers; {gm.path.name} has {arch}.block_count={st.num_layers}")
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
    if moe is not None and sorted(moe) not in (st.moe_layers, sorted(set(st.moe_layers) - set(st.frozen_layers))):
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


def _out_tensors(part: GGUFFile, expert_tensors: frozenset[str], kept: dict[int, list[int]]) -> list[OutTensor]:
    planned = []
    for t in part.tensors:
        m = BLOCK_TENSOR.match(t.name)
        ids = kept.get(int(m.group(1))) if m and m.group(2) in expert_tensors else None
        if ids is None or len(ids) == t.ne[-1]:
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


def _out_paths(out: Path, n_parts: int) -> list[Path]:
    if n_parts == 1:
        return [out]
    m = SPLIT_PATTERN.match(out.name)
    prefix = m.group("prefix") if m else (out.name[:-5] if out.name.endswith(".gguf") else out.name)
    return [out.with_name(split_name(prefix, i + 1, n_parts)) for i in range(n_parts)]


def _layer_policy(gm: Model, after: dict[int, int]) -> tuple[list[int], list[int], list[int]]:
    st = gm.structure
    policy, count, keep = [], [], []
    for L in range(st.num_layers):
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


def plan_layout(gm: Model, plan: Plan, out: Path, where: str) -> tuple[list[OutPart], dict]:
    """Every output header and tensor's source ranges, before any byte is written."""
    st, arch = gm.structure, gm.gguf_arch
    kept = plan.kept_map()
    after = {L: len(kept.get(L, range(n))) for L, n in st.layer_experts.items()}
    counts = sorted(set(after.values()))
    edits: dict[str, bytes] = {}
    additions: dict[str, bytes] = {}
    if gm.family.gguf_compact_layout:
        layout = gm.family.gguf_compact_layout
        policy, count, keep = _layer_policy(gm, after)
        additions = {
            "reap.enabled": encode_kv("reap.enabled", VType.BOOL, True),
            "reap.layout": encode_kv("reap.layout", VType.STRING, layout),
            "reap.layer.policy": encode_kv("reap.layer.policy", VType.ARRAY, policy, VType.UINT32),
            "reap.layer.expert_count": encode_kv("reap.layer.expert_count", VType.ARRAY, count, VType.UINT32),
            "reap.layer.keep_count": encode_kv("reap.layer.keep_count", VType.ARRAY, keep, VType.UINT32),
        }
    elif len(counts) == 1:
        layout = "uniform"
        key = f"{arch}.expert_count"
        kv: KV = gm.gguf_parts[0].kvs[key]
        edits[key] = encode_kv(key, kv.vtype, counts[0])
    else:
        frozen = f" (layers {st.frozen_layers} are never pruned)" if st.frozen_layers else ""
        raise BadInput(where, f"plan keeps {counts[0]}..{counts[-1]} experts in different layers{frozen}; llama.cpp's "
                              f"{arch!r} loader reads one {arch}.expert_count for all layers, so only uniform "
                              f"plans apply to this GGUF (ds4-compact-v1 exists for deepseek4 only)")
    parts = []
    for i, (src, path) in enumerate(zip(gm.gguf_parts, _out_paths(out, len(gm.gguf_parts)))):
        tensors = _out_tensors(src, gguf_expert_tensors(gm.family), kept)
        kv_raw = _metadata(src, edits, list(additions.values()) if i == 0 else [])
        parts.append(OutPart(path, src, encode_header(src.version, kv_raw, tensors, src.alignment), tensors))
    info = {"layout": layout,
            "experts_after": counts[0] if len(counts) == 1 else {str(L): n for L, n in sorted(after.items())},
            "metadata_changed": sorted(edits) + list(additions)}
    return parts, info


# ---------------------------------------------------------------- writing

def manifest_path(first_part: Path) -> Path:
    """The sidecar holding the sha256 and size of every part: beside the first part, named after it.
    A sidecar, not a metadata entry: a file cannot hold its own checksum, and the GGUF bytes stay
    exactly what llama.cpp loads (no key or tensor it does not know)."""
    return first_part.with_name(first_part.name + GGUF_MANIFEST_SUFFIX)


def _digest(part: OutPart, buffer_bytes: int) -> str:
    """sha256 of what `_write_part` writes, from the source ranges (on a second thread, beside the copy)."""
    sha = hashlib.sha256(part.header)
    buf = memoryview(bytearray(buffer_bytes))
    with open(part.source.path, "rb", buffering=0) as src:
        for t in part.tensors:
            for start, length in t.pieces:
                pos, end = start, start + length
                while pos < end:
                    n = os.preadv(src.fileno(), [buf[:min(len(buf), end - pos)]], pos)
                    if n <= 0:
                        raise BadInput(part.source.path, f"unexpected end of file at byte {pos}")
                    sha.update(buf[:n])
                    pos += n
            sha.update(bytes(-t.nbytes % part.source.alignment))
    return sha.hexdigest()


def _write_part(part: OutPart, tmp: Path, buf: memoryview, bar: tqdm) -> None:
    # the safetensors apply's range copy: copy_file_range where it can, short writes retried
    align = part.source.alignment
    with open(part.source.path, "rb", buffering=0) as src, open(tmp, "wb", buffering=0) as dst:
        write_all(dst.fileno(), part.header)
        for t in part.tensors:
            for start, length in t.pieces:
                copy_range(src.fileno(), dst.fileno(), start, start + length, buf, part.source.path)
                bar.update(length)
            write_all(dst.fileno(), bytes(-t.nbytes % align))
        os.fsync(dst.fileno())


def apply_gguf(gm: Model, plan: Plan, out: Path, *, overwrite: bool, dry_run: bool,
               buffer_bytes: int = 8 << 20, plan_where: str | Path = "plan", progress: bool = True) -> dict:
    """Write `out` (or its split parts): the GGUF model `gm` with the plan's pruned experts removed.

    Returns a JSON-able summary; a GGUF is always matched to the plan by structure, never by
    file hash. `progress=False` hides the byte bar (apply --quiet / --json).
    """
    out, where = Path(out), str(plan_where)
    model = gm.path
    _check_same_model(plan, gm, where)
    check_plan(plan, gm.structure, where)
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
        "tensors": sum(len(p.tensors) for p in parts),
        "tensors_sliced": sum(t.sliced for p in parts for t in p.tensors),
        "bytes_in": sum(g.size for g in gm.gguf_parts),
        "bytes_out": sum(p.size for p in parts),
        "fingerprint": "not compared: a GGUF is matched to the plan by structure "
                       "(architecture, layer count, experts per layer)",
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
            summary["files"] = _write_parts(parts, buffer_bytes, model.name, progress)
        except OSError as e:
            ours = e.filename is None or Path(e.filename).name.endswith(".partial")  # a temporary: name the output
            raise os_error(e, out if ours else e.filename, needed=needed, doing="cannot write the output") from None
    return summary


def _write_parts(parts: list[OutPart], buffer_bytes: int, name: str, progress: bool) -> dict:
    """Every part under a temporary name, then renamed into place; the sidecar manifest last. An
    overwritten output loses its old manifest first, so a run dying among the renames leaves
    parts that `verify` reports as unchecked, never a set that passes."""
    buf = memoryview(bytearray(buffer_bytes))
    tmps = [p.path.with_name(f".{p.path.name}.partial") for p in parts]
    total = sum(t.nbytes for p in parts for t in p.tensors)
    files = {}
    try:
        with ThreadPoolExecutor(max_workers=1) as pool, \
                tqdm(total=total, unit="B", unit_scale=True, desc=f"apply {name}",
                     disable=None if progress else True) as bar:
            for p, tmp in zip(parts, tmps):
                digest = pool.submit(_digest, p, len(buf))
                _write_part(p, tmp, buf, bar)
                files[p.path.name] = {"sha256": digest.result(), "size": os.stat(tmp).st_size}
        sidecar = manifest_path(parts[0].path)
        if os.path.lexists(sidecar):
            os.unlink(sidecar)
        # the first part is what loaders open: it appears last, when every other part is in place
        for p, tmp in reversed(list(zip(parts, tmps))):
            os.replace(tmp, p.path)
        write_text_atomic(sidecar, json.dumps({"format": GGUF_MANIFEST_FORMAT, "tool_version": __version__,
                                               "files": files}, indent=2, sort_keys=True) + "\n")
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
    return files
