"""`wanrt decode`: finish a run whose decode or video write failed, from its latents file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from wanrt.cli.generate import print_result
from wanrt.generate import decode_latents, parse_device


def decode_command(
    latents: Annotated[Path, typer.Argument(help="The .latents.safetensors file written by `wanrt generate`.")],
    output: Annotated[Path | None, typer.Option(
        "--output", "--save-file", "--save_file",
        help="Output .mp4 (default: the run's <run>.mp4 if absent, else <run>_decoded.mp4; never replaced).")] = None,
    ckpt_dir: Annotated[Path | None, typer.Option(
        "--ckpt-dir", "--ckpt_dir", help="Checkpoint folder (default: the one the run used).")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda or cuda:N.")] = None,
) -> None:
    """Decode saved latents to an mp4 plus its JSON sidecar."""
    console = Console(stderr=True, soft_wrap=True, highlight=False)
    record = decode_latents(latents, output, ckpt_dir, device=parse_device(device),
                            on_decode=lambda: console.print(f"decoding {latents} with the VAE...", markup=False))
    print_result(record)
