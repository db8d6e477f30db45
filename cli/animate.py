"""`wanrt generate --task animate-14B --src_root_path DIR [--refert_num 1|5] [--replace_flag
--use_relighting_lora]`: the official Animate options, validated here and run by
`wanrt.animate_video.generate_animation`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import typer

from wanrt.animate_video import AnimationRecord, generate_animation
from wanrt.configs import TASK_NAMES, ModelType, get_task
from wanrt.errors import InputError
from wanrt.generate import check_output_path, parse_device
from wanrt.lora import LoraSpec
from wanrt.pipelines.animate import AnimatePipeline, AnimateRequest

ANIMATE_TASKS = tuple(name for name in TASK_NAMES if get_task(name).dit.model_type is ModelType.ANIMATE)


@dataclass(frozen=True)
class AnimateOptions:
    """The official generate.py's Animate flags."""

    src_root_path: Path | None = None
    refert_num: int = 1
    replace_flag: bool = False
    use_relighting_lora: bool = False

    def given(self) -> list[str]:
        return [flag for flag, value in (("--src_root_path", self.src_root_path is not None),
                                         ("--replace_flag", self.replace_flag),
                                         ("--use_relighting_lora", self.use_relighting_lora)) if value]


def refuse_animate_options(options: AnimateOptions, task: str) -> None:
    """Animate's flags given to another task: one line, before anything loads."""
    if options.given():
        raise InputError(f"{', '.join(options.given())} apply to --task {' or '.join(ANIMATE_TASKS)}, not {task}")


def refuse_unsupported(unsupported: Mapping[str, bool], task: str) -> None:
    given = [flag for flag, value in unsupported.items() if value]
    if given:
        raise InputError(f"{', '.join(given)} do(es) not apply to --task {task}; Animate takes its size and length "
                         "from --src_root_path")


def print_animation(record: AnimationRecord) -> None:
    typer.echo(f"video:   {record.video_path.absolute()}")
    typer.echo(f"sidecar: {record.sidecar_path.absolute()}")
    typer.echo(f"total:   {record.sidecar['timings_s']['total']:.1f} s")
    typer.echo(f"dit forwards: {record.sidecar['runtime']['dit_forwards']}")


def run_animate(task: str, options: AnimateOptions, request: AnimateRequest, loras: Sequence[LoraSpec],
                ckpt_dir: Path | None, output: Path | None, device: str | None, dtype: torch.dtype | None,
                t5_cpu: bool, precision: str, vram: float | None, ram: float | None,
                run_options: Mapping[str, Any]) -> AnimationRecord:
    """Validate every option and the inputs' presence, then build the pipeline and run."""
    spec = get_task(task)
    if ckpt_dir is None:
        raise InputError("--ckpt-dir is required: the folder of the downloaded Wan2.2-Animate-14B checkpoint")
    if options.src_root_path is None:
        raise InputError("--src_root_path is required: the folder written by the official Wan2.2-Animate "
                         "preprocess_data.py")
    if options.use_relighting_lora and not request.replace:
        raise InputError("--use_relighting_lora is for character replacement; add --replace_flag")
    request.resolved(spec)  # every sampling option checked before anything loads
    target = check_output_path(output or Path(f"{spec.name}_{Path(options.src_root_path).name}.mp4"))
    pipeline = AnimatePipeline.from_pretrained(
        ckpt_dir, spec.name, device=parse_device(device), dtype=dtype, t5_cpu=t5_cpu, vram_gib=vram, ram_gib=ram,
        precision=precision, loras=loras, use_relighting_lora=options.use_relighting_lora)
    record = generate_animation(pipeline, request, options.src_root_path, target,
                                run_options={**run_options, "use_relighting_lora": options.use_relighting_lora})
    print_animation(record)
    return record
