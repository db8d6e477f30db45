"""`wanrt quantize`: calibrate, guard and save quantized experts (see wanrt.quantize_checkpoint)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wanrt.cli.generate import load_image_option
from wanrt.generate import VIDEO_MODEL_TYPES, generation_task, parse_device
from wanrt.pipelines import Pipeline
from wanrt.quantize_checkpoint import quantize_checkpoint
from wanrt.runtime.planner import Precision

CALIBRATION_PROMPT = "A cat walks on the grass, realistic style, daylight, a city street behind"


def quantize_command(
    ckpt_dir: Annotated[Path, typer.Option("--ckpt-dir", "--ckpt_dir", help="Checkpoint to quantize.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the quantized experts (official layout).")],
    task: Annotated[str, typer.Option("--task", help="t2v-A14B, i2v-A14B or ti2v-5B (or a tiny-* test task).")]
    = "t2v-A14B",
    scheme: Annotated[Precision, typer.Option("--scheme", help="fp8 or int8.")] = Precision.FP8,
    threshold: Annotated[float | None, typer.Option(
        "--threshold", help="Relative error above which a layer stays bf16 (default: the scheme's).")] = None,
    prompt: Annotated[str, typer.Option("--prompt", help="Calibration prompt.")] = CALIBRATION_PROMPT,
    size: Annotated[str | None, typer.Option("--size", help="Calibration size (default: the task's).")] = None,
    frame_num: Annotated[int, typer.Option("--frame-num", help="Calibration frames, 4n+1.")] = 5,
    steps: Annotated[int, typer.Option("--timesteps", help="Calibration timesteps per expert.")] = 3,
    image: Annotated[Path | None, typer.Option(
        "--image", help="Calibration first frame: required for i2v, optional for ti2v.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda or cuda:N.")] = None,
) -> None:
    """Quantize the DiT experts with the fidelity guard; use the result with `generate --quantized`."""
    if scheme is Precision.BF16:
        raise typer.BadParameter("--scheme must be fp8 or int8")
    spec = generation_task(task, VIDEO_MODEL_TYPES, "wanrt quantize")
    pipeline = Pipeline.from_pretrained(ckpt_dir, spec.name, device=parse_device(device))
    for result in quantize_checkpoint(pipeline, out, scheme.value, prompt, size=size, frame_num=frame_num,
                                      timesteps_per_expert=steps, threshold=threshold,
                                      image=load_image_option(image)):
        typer.echo(f"{result.expert.value}: {result.report.summary()} -> {result.folder}")
