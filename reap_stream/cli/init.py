"""`reap-stream init`: synthetic telemetry for demos, tests and planning experiments."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import BadInput
from ..io.lock import exclusive
from ..telemetry.store import TelemetryStore
from ..telemetry.synthetic import write_synthetic_telemetry
from .options import PATH


@click.command("init")
@click.option("--out", required=True, type=PATH, help="Telemetry store to create.")
@click.option("--layers", default=8, show_default=True, help="MoE layers.")
@click.option("--experts", default=16, show_default=True, help="Routed experts per layer.")
@click.option("--top-k", default=2, show_default=True, help="Experts per token.")
@click.option("--tokens", default=2048, show_default=True, help="Synthetic calibration tokens.")
@click.option("--hidden", default=32, show_default=True, help="Hidden size of expert outputs.")
@click.option("--n-group", default=1, show_default=True, help="Expert groups (DeepSeek-style group routing).")
@click.option("--topk-group", default=1, show_default=True, help="Groups each token may use.")
@click.option("--seed", default=0, show_default=True)
@click.option("--like", "like", type=PATH,
              help="Shape the store like this model directory (its MoE layers, experts, top_k, fingerprint).")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
def init_cmd(out: Path, layers: int, experts: int, top_k: int, tokens: int, hidden: int, n_group: int,
             topk_group: int, seed: int, like: Path | None, overwrite: bool) -> None:
    """Write synthetic telemetry (varied experts, never-routed ones, a super expert) for demos and tests."""
    model = None
    if like is not None:
        from ..families.model import open_model
        resolved = open_model(like)
        model, hidden = resolved.model_block(), resolved.hidden_size
    with exclusive(out, "telemetry store"):
        if out.exists() and not overwrite:
            raise BadInput(out, "exists; pass --overwrite to replace it")
        if out.exists():
            TelemetryStore.open(out)  # only ever replace a telemetry store
        store = write_synthetic_telemetry(out, layers=layers, experts=experts, seed=seed, top_k=top_k, tokens=tokens,
                                          hidden=hidden, n_group=n_group, topk_group=topk_group, model=model,
                                          progress=True)
    m = store.attrs["model"]
    click.echo(f"wrote {out}: {len(m['moe_layers'])} MoE layers x {m['num_experts']} experts, top_k={m['top_k']}, "
               f"{tokens} tokens, telemetry {store.fingerprint()[:19]}…")
