#!/usr/bin/env python3
"""The README's table of GGUF architectures: every MoE architecture gguf-py knows, with what apply,
collect and the llama.cpp check do for it, derived from the code (gguf-py's tables, the family
rows, the refusals) and, optionally, from a run of tools/check_gguf_llamacpp.py --json.

    python tools/check_gguf_llamacpp.py --llama-python LLAMA_VENV/bin/python --json > llamacpp.json
    python tools/gguf_arch_table.py --llamacpp-json llamacpp.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# the families whose GGUF form is compared with their MLX form in the test suite
TESTED_COLLECT = {"qwen3moe", "qwen2moe", "olmoe", "llama", "gpt-oss", "deepseek2", "glm4moe"}
NOT_MOE_IN_LLAMA_CPP = {"deci", "llama-embed", "mistral3"}


def rows(llamacpp: dict | None) -> list[tuple[str, str, str, str]]:
    from reap_stream.families.gguf_arch import COUNT_SWITCHES, GROUP_KEYS, moe_archs
    from reap_stream.families.gguf_source import NOT_READABLE
    from reap_stream.families.table import BY_GGUF_ARCH

    checked: dict[str, list[dict]] = {}
    for r in (llamacpp or {}).get("checked", []):
        checked.setdefault(r["arch"], []).append(r)
    out = []
    for arch in moe_archs() + [a for a, f in BY_GGUF_ARCH.items() if a not in moe_archs()]:
        fam = BY_GGUF_ARCH.get(arch)
        if arch in NOT_MOE_IN_LLAMA_CPP:
            out.append((arch, "no experts in llama.cpp's loader", "—", "—"))
            continue
        apply = "uniform" if fam else "uniform, once a family row names it"
        if fam and fam.gguf_compact_layout:
            apply = f"any plan ({fam.gguf_compact_layout})"
        if arch in COUNT_SWITCHES:
            apply += "; refused at " + ", ".join(f"{n} experts" for n in COUNT_SWITCHES[arch])
        if arch in GROUP_KEYS:
            apply += f"; whole groups of {GROUP_KEYS[arch]}"
        if arch in NOT_READABLE:
            collect = f"no: {NOT_READABLE[arch]}"
        elif fam is None:
            collect = "with its mlx_lm family row"
        elif not fam.mlx:
            collect = "no (no mlx_lm model class)"
        else:
            collect = "yes, tested against the MLX form" if arch in TESTED_COLLECT else "yes (untested)"
        runs = checked.get(arch, [])
        if runs:
            check = ", ".join(f"{r['qtype']} " + {True: "pass", False: "FAIL", None: "n/a"}[r["ok"]] for r in runs)
        elif fam is not None and not fam.mlx:
            check = "not run: no tiny mlx_lm model to build"
        else:
            check = "not run"
        out.append((arch, apply, collect, check))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llamacpp-json", type=Path, help="output of tools/check_gguf_llamacpp.py --json")
    args = ap.parse_args()
    llamacpp = json.loads(args.llamacpp_json.read_text()) if args.llamacpp_json else None
    print("| arch | apply | collect / eval / full | llama.cpp check (pruned GGUF vs masked original) |")
    print("|---|---|---|---|")
    for r in rows(llamacpp):
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
