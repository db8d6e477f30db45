"""The `wanrt` command: a Typer app whose subcommands live in their own modules.

Every library error (`WanrtError`) becomes one line on stderr and exit code 2 here, in
one place, so the subcommands just call the library and let typed errors propagate.
"""

from __future__ import annotations

import os
from typing import Annotated

import click
import typer
from typer.core import TyperGroup

from wanrt import __version__
from wanrt.cli import decode, demo, doctor, generate, plan, quantize
from wanrt.cli.display import TerminalProgress
from wanrt.cli import bench
from wanrt.cli import k8s, preview, refine
from wanrt.cli import export
from wanrt.cli import animate_prep
from wanrt.errors import WanrtError
from wanrt.interrupts import Interrupted, signals_as_interrupts
from wanrt.progress import reporting

# Recent Typer releases vendor click as `typer._click` and raise its exception classes;
# older ones use click itself.
_click = getattr(typer.core, "_click", click)

USER_ERROR_EXIT_CODE = 2


def one_line(message: str) -> str:
    return " ".join(message.split())


class _WanrtGroup(TyperGroup):
    def invoke(self, ctx: click.Context):
        try:
            # Every tracked loop of the command (loading, T5, sampling, VAE, export...)
            # draws on one progress display on stderr.
            with signals_as_interrupts(), reporting(TerminalProgress()):
                return super().invoke(ctx)
        except Interrupted as interrupt:
            click.echo(f"interrupted ({interrupt.signal_name}): {one_line(interrupt.kept)}", err=True)
            ctx.exit(interrupt.exit_code)
        except WanrtError as error:
            click.echo(f"error: {one_line(str(error))}", err=True)
            ctx.exit(USER_ERROR_EXIT_CODE)
        except _click.exceptions.UsageError as error:
            # A value click itself rejects (`--steps abc`, an unknown option): the same one
            # line as our own validation instead of Typer's boxed panel.
            command = error.ctx.command_path if error.ctx is not None else ctx.command_path
            click.echo(f"error: {one_line(error.format_message())} (see: {command} --help)", err=True)
            ctx.exit(error.exit_code)


app = typer.Typer(cls=_WanrtGroup, name="wanrt", no_args_is_help=True, add_completion=False,
                  help="Optimized runtime for the open Wan2.2 video diffusion models.")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"wanrt {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False) -> None:
    """Optimized runtime for the open Wan2.2 video diffusion models."""


app.command("generate", no_args_is_help=True)(generate.generate_command)
app.command("decode", no_args_is_help=True)(decode.decode_command)
app.command("demo")(demo.demo_command)
app.command("plan")(plan.plan_command)
app.command("doctor")(doctor.doctor_command)
app.command("quantize", no_args_is_help=True)(quantize.quantize_command)
app.command("export", no_args_is_help=True)(export.export_command)
app.command("bench")(bench.bench_command)
app.command("preview", no_args_is_help=True)(preview.preview_command)
app.command("refine", no_args_is_help=True)(refine.refine_command)
app.command("animate-prep", no_args_is_help=True)(animate_prep.animate_prep_command)
app.add_typer(k8s.k8s_app, name="k8s")


def main() -> None:
    # Streaming allocates and frees block-sized activations all run long; expandable
    # segments keep that from fragmenting the cache (read when CUDA first allocates).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    app(prog_name="wanrt")
