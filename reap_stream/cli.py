"""`reap-stream` command line. Subcommands live in their own modules and load on first use."""
from __future__ import annotations

import importlib
import sys

import click

from . import __version__
from .errors import BadInput

# command name -> "module:attribute" of its click command
COMMANDS = {
    "apply": "reap_stream.apply_cmd:apply_cmd",
    "plan": "reap_stream.plan_cmd:plan_cmd",
    "init": "reap_stream.plan_cmd:init_cmd",
    "parity": "reap_stream.parity_cmd:parity_cmd",
    "report": "reap_stream.report_cmd:report_cmd",
    "verify": "reap_stream.verify_cmd:verify_cmd",
    "doctor": "reap_stream.doctor_cmd:doctor_cmd",
    "full": "reap_stream.full_cmd:full_cmd",
    "demo": "reap_stream.full_cmd:demo_cmd",
    "collect": "reap_stream.collect_cmd:collect_cmd",
    "merge": "reap_stream.collect_cmd:merge_cmd",
    "eval": "reap_stream.eval_cmd:eval_cmd",
    "compare": "reap_stream.eval_cmd:compare_cmd",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BadInput as e:
            click.echo(f"reap-stream: error: {e}", err=True)
            sys.exit(2)


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="reap-stream")
def cli() -> None:
    """Streaming out-of-core REAP expert pruning for Mixture-of-Experts checkpoints."""


def main() -> None:
    # Commands that run MLX load the optimised BLAS themselves (blas.ensure_blas, before their
    # first `import mlx`); apply, plan, verify and the rest never pay for it.
    cli()


if __name__ == "__main__":
    main()
