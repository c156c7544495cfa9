#!/usr/bin/env python3
"""Regenerate fixtures/calibration/: small calibration files of real text in every input format.

Text comes from what every Debian/Ubuntu machine has: the Apache-2.0 licence in
/usr/share/common-licenses (paragraphs) and docstrings of Python standard-library functions
(chat questions and answers; they change between Python versions, so the committed files are the
reference and this script only rebuilds them on purpose). Output is deterministic.

    python tools/make_calibration_files.py [OUT_DIR]
"""
from __future__ import annotations

import csv
import importlib
import inspect
import io
import json
import sys
from pathlib import Path

LICENSE = Path("/usr/share/common-licenses/Apache-2.0")
# (module, function) pairs whose docstrings answer "what does X do?"
DOC_FUNCTIONS = (
    ("textwrap", "dedent"), ("textwrap", "wrap"), ("json", "dumps"), ("json", "loads"),
    ("os.path", "join"), ("os.path", "splitext"), ("shutil", "copyfile"), ("shutil", "rmtree"),
    ("functools", "lru_cache"), ("itertools", "groupby"), ("bisect", "insort_left"), ("heapq", "heappush"),
)
NUM_PARAGRAPHS = 24


def license_paragraphs() -> list[str]:
    text = LICENSE.read_text()
    paras = [" ".join(p.split()) for p in text.split("\n\n")]
    return [p for p in paras if len(p) > 80][:NUM_PARAGRAPHS]


def doc_pairs() -> list[tuple[str, str]]:
    pairs = []
    for module, name in DOC_FUNCTIONS:
        doc = inspect.getdoc(getattr(importlib.import_module(module), name)) or ""
        answer = " ".join(doc.split("\n\n")[0].split())
        pairs.append((f"What does {module}.{name} do in Python?", answer))
    return pairs


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)


def build() -> dict[str, str]:
    """File name -> contents."""
    paras = license_paragraphs()
    pairs = doc_pairs()
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["id", "text"])
    writer.writerows((i, p) for i, p in enumerate(paras))
    chat = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]
    # ShareGPT layout, nested one level, and one row with nothing usable
    sharegpt = [{"conversation": {"turns": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}}
                for q, a in pairs[:4]] + [{"conversation": {"turns": []}}]
    nested = [{"doc": {"title": f"Apache-2.0 paragraph {i}", "body": p}, "id": i} for i, p in enumerate(paras)]
    nested.insert(3, {"doc": {"title": "empty", "body": ""}, "id": -1})
    return {
        "licence.txt": "\n\n".join(paras) + "\n",
        "licence.jsonl": jsonl([{"text": p} for p in paras]),
        "licence.json": json.dumps([{"text": p} for p in paras], indent=1, ensure_ascii=False) + "\n",
        "licence.csv": table.getvalue(),
        "nested.jsonl": jsonl(nested),
        "chat.jsonl": jsonl(chat),
        "sharegpt.jsonl": jsonl(sharegpt),
    }


def main(out_dir: str = "fixtures/calibration") -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in sorted(build().items()):
        (out / name).write_text(text, encoding="utf-8")
        print(f"{out / name}: {len(text.encode())} bytes")


if __name__ == "__main__":
    main(*sys.argv[1:])
