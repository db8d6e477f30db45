"""`wanrt doctor`: the machine, the optional extras and what fits here, in one screen."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated

import typer

from wanrt.doctor import diagnose


def doctor_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check the install: torch/CUDA/driver, GPUs, RAM, cache disk, PyAV, optional extras, what fits."""
    report = diagnose()
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(report), indent=2, default=str))
    else:
        typer.echo("\n".join(report.lines()))
