"""`wanrt plan`: print the memory plan of a run before anything loads."""

from __future__ import annotations

import json
from typing import Annotated

import torch
import typer

from wanrt.configs import ModelType, get_task
from wanrt.errors import InputError
from wanrt.export.manifest import device_arch
from wanrt.export.quantize import resolve_precision
from wanrt.pipelines import GenerationRequest
from wanrt.runtime.planner import PrecisionChoice, RamMode, make_plan, require_fit


def plan_command(
    task: Annotated[str, typer.Option("--task", help="t2v-A14B, i2v-A14B or ti2v-5B.")] = "t2v-A14B",
    size: Annotated[str | None, typer.Option(
        "--size", help="WIDTH*HEIGHT (default: the task's; t2v takes any multiple of the latent patch).")] = None,
    frames: Annotated[int | None, typer.Option("--frames", "--frame-num", "--frame_num",
                                               help="4n+1 frames (default: the task's).")] = None,
    precision: Annotated[PrecisionChoice, typer.Option(
        "--precision", help="DiT weight precision (auto: the one --arch runs best).")] = PrecisionChoice.BF16,
    arch: Annotated[str | None, typer.Option(
        "--arch", help="GPU architecture --precision auto plans for, e.g. sm_89 (default: this machine's GPU).")]
    = None,
    vram: Annotated[float, typer.Option("--vram", help="GPU memory budget, GiB.")] = 24.0,
    ram: Annotated[float, typer.Option("--ram", help="Host RAM budget, GiB.")] = 64.0,
    image: Annotated[bool, typer.Option("--image/--no-image", help="Plan an image-conditioned run.")] = False,
    t5_cpu: Annotated[bool | None, typer.Option("--t5-cpu/--t5-gpu", help="Force T5's placement.")] = None,
    ram_mode: Annotated[RamMode | None, typer.Option(
        "--ram-mode", help="Host RAM use: both experts, or one expert at a time (default: what fits).")] = None,
    quantize_at_load: Annotated[bool, typer.Option(
        "--quantize-at-load", help="fp8/int8 quantized while loading the bf16 checkpoint (not from --quantized).")]
    = False,
    steps: Annotated[int | None, typer.Option("--steps", help="Sampling steps, for the time estimate.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Show the resident/streamed split, buffers, predicted peaks and whether it fits."""
    spec = get_task(task)
    if arch is not None and precision is not PrecisionChoice.AUTO:
        raise InputError("--arch only picks the precision of --precision auto; drop it, or use --precision auto")
    arch = arch or (device_arch("cuda") if torch.cuda.is_available() else None)
    weights = resolve_precision(precision, arch)
    if precision is PrecisionChoice.AUTO:
        typer.echo(f"precision auto: {weights.value} ({arch})", err=True)
    # The same validation as `generate` (the task's sizes, 4n+1 frames); i2v requires an
    # image there, so a placeholder stands in for it.
    placeholder = torch.zeros(3, 16, 16) if spec.dit.model_type is ModelType.I2V else None
    resolved = GenerationRequest(prompt="", size=size, frame_num=frames, steps=steps,
                                 image=placeholder).resolved(spec)
    plan = make_plan(spec, resolved.size, resolved.frame_num, weights, vram, ram, image=image,
                     t5_cpu=t5_cpu, ram_mode=ram_mode, quantize_at_load=quantize_at_load, steps=resolved.steps)
    typer.echo(json.dumps(plan.to_dict(), indent=2) if as_json else "\n".join(plan.lines()))
    require_fit(plan)
