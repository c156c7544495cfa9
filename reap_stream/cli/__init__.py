"""`reap-stream` command line. Subcommands live in their own modules and load on first use."""
from __future__ import annotations

import importlib
import os
import sys

import click

from .. import __version__
from ..errors import BadInput, one_line, os_error

# Quiet by default: a command's stderr holds its progress bars and at most one error line. The
# libraries below us announce their own state (transformers: "PyTorch was not found" on every run
# without torch, which tokenizers do not need); a user who wants their messages sets these.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# command name -> ("module:attribute" of its click command, the first line of its help). The
# summaries are here so that `reap-stream --help` imports no command module (tests/test_cli.py
# keeps them equal to the commands' own).
COMMANDS = {
    "apply": ("reap_stream.cli.apply:apply_cmd",
              "Apply PLAN to MODEL (a safetensors model directory or a GGUF file) and write OUT."),
    "plan": ("reap_stream.cli.plan:plan_cmd", "Choose the experts to prune from TELEMETRY and write a plan."),
    "init": ("reap_stream.cli.init:init_cmd",
             "Write synthetic telemetry (varied experts, never-routed ones, a super expert) for demos and tests."),
    "parity": ("reap_stream.cli.parity:parity_cmd",
               "Compare telemetry stores LEFT and RIGHT; exit 1 when they disagree on what to prune."),
    "report": ("reap_stream.cli.report:report_cmd",
               "Summarise TELEMETRY (and a plan made from it) as markdown and PNG figures."),
    "verify": ("reap_stream.cli.verify:verify_cmd",
               "Check OUT_DIR's manifest checksums, tensor shapes against config.json, and the plan record "
               "(or, for a recompacted .gguf file, its manifest checksums, layout and expert counts)."),
    "doctor": ("reap_stream.cli.doctor:doctor_cmd",
               "Report the BLAS, MLX device, memory and package versions reap-stream will use."),
    "full": ("reap_stream.cli.full:full_cmd",
             "Collect telemetry, plan and apply in one resumable run (a GGUF MODEL gives a GGUF --out)."),
    "estimate": ("reap_stream.cli.estimate:estimate_cmd",
                 "Peak memory, disk and time of collect -> plan -> apply on MODEL, from its config.json and "
                 "safetensors headers (or a bare config.json), without reading any weight."),
    "demo": ("reap_stream.cli.demo:demo_cmd",
             "Generate a tiny MoE, prune it with REAP end to end, and check the result."),
    "collect": ("reap_stream.cli.collect:collect_cmd",
                "Collect REAP telemetry of MODEL_DIR (a model directory or a GGUF file) on calibration text "
                "into --out."),
    "merge": ("reap_stream.cli.collect:merge_cmd",
              "Add telemetry stores of one model collected on disjoint calibration shards."),
    "eval": ("reap_stream.cli.eval:eval_cmd",
             "Perplexity of MODEL_DIR (a model directory or a GGUF file) on --prompt / --dataset-file text, "
             "layer by layer."),
    "compare": ("reap_stream.cli.eval:compare_cmd",
                "Max and mean |logit difference| of MODEL_A and MODEL_B on the same tokens (A's tokenizer)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name][0].split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, summary) for name, (_, summary) in sorted(COMMANDS.items())])

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BadInput as e:
            _fail(e)
        except OSError as e:  # the file system refused something no command foresaw: still one line
            _fail(os_error(e))


def _fail(e: BadInput) -> None:
    click.echo(f"reap-stream: error: {one_line(str(e))}", err=True)
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
