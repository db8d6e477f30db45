"""`wanrt generate --task animate-14B`: read the preprocessed folder, run the segment loop,
write the mp4 (atomically) and its JSON sidecar."""

from __future__ import annotations

import dataclasses
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

import wanrt
from wanrt.generate import check_output_path, resolve_seed, sidecar_path_for
from wanrt.loading.save import write_json
from wanrt.pipelines.animate import AnimatePipeline, AnimateRequest, read_source
from wanrt.pipelines.core import StepInfo
from wanrt.video_io import VideoInfo, write_video


@dataclass(frozen=True)
class AnimationRecord:
    video_path: Path
    sidecar_path: Path
    video_info: VideoInfo
    sidecar: Mapping[str, Any]


def generate_animation(pipeline: AnimatePipeline, request: AnimateRequest, src_root_path: Path, output: Path, *,
                       on_step: Callable[[StepInfo], None] | None = None,
                       run_options: Mapping[str, Any] | None = None) -> AnimationRecord:
    """Animate (or replace) the character of `src_root_path` and write `output`; a negative
    seed draws one (recorded). Inputs are all read and checked before any model loads."""
    started = time.perf_counter()
    output = check_output_path(output)
    seed, seed_was_random = resolve_seed(request.seed)
    resolved = dataclasses.replace(request, seed=seed).resolved(pipeline.task)
    source = read_source(src_root_path, resolved.replace)
    video = pipeline.animate(resolved, source, on_step=on_step)
    fps = pipeline.task.sample.fps
    info = write_video(video, output, fps=fps)
    sidecar = {
        "wanrt_version": wanrt.__version__, "torch_version": torch.__version__,
        "python_version": platform.python_version(), "task": pipeline.task.name,
        "settings": resolved.settings(), "seed": seed, "seed_was_random": seed_was_random, "fps": fps,
        "source": {"src_root_path": str(Path(src_root_path).absolute()), "frames": source.num_frames,
                   "height": source.pose.shape[1], "width": source.pose.shape[2]},
        "runtime": {"device": str(pipeline.device), "dit_dtype": str(pipeline.dit_dtype).removeprefix("torch."),
                    "precision": pipeline.precision, "dit_forwards": pipeline.dit_forwards,
                    "memory_plan": pipeline.plan.to_dict() if pipeline.plan else None,
                    "loras": pipeline.lora_records()},
        "options": dict(run_options or {}),
        "timings_s": {"load": dict(pipeline.load_seconds), "total": time.perf_counter() - started},
    }
    sidecar_path = sidecar_path_for(output)
    write_json(sidecar_path, sidecar)
    return AnimationRecord(output, sidecar_path, info, sidecar)
