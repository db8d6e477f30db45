"""One Animate run: read the preprocessed folder, run the segment loop, write the mp4 and its
JSON sidecar. Like s2v there is no latents file: each segment is decoded inside the loop,
because the next segment starts from the last generated frames."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping

from wanrt.generate import (EmbeddingCache, GenerationRecord, _ExpertTimer, _peak_memory, _video_record,
                            check_output_path, run_sidecar, sidecar_path_for, start_run)
from wanrt.loading.save import write_json
from wanrt.pipelines.animate import AnimatePipeline, AnimateRequest, read_source
from wanrt.pipelines.core import StepInfo
from wanrt.video_io import write_video


def generate_animation(pipeline: AnimatePipeline, request: AnimateRequest, src_root_path: Path, output: Path, *,
                       embedding_cache: EmbeddingCache | None = None,
                       on_step: Callable[[StepInfo], None] | None = None,
                       run_options: Mapping[str, Any] | None = None) -> GenerationRecord:
    """Animate (or replace) the character of `src_root_path` and write `output`. The folder
    is read and checked before any model loads; a negative seed draws one (recorded)."""
    started = time.perf_counter()
    output = check_output_path(output)
    request.resolved(pipeline.task)
    source = read_source(src_root_path, request.replace)
    resolved, seed_was_random, embeddings, cache_state, text_seconds = start_run(pipeline, request, embedding_cache)
    timer = _ExpertTimer(on_step)
    video = pipeline.animate(resolved, source, embeddings, on_step=timer)
    fps = pipeline.task.sample.fps
    sidecar = run_sidecar(pipeline, resolved, seed_was_random, fps, cache_state, run_options,
                          {"text_encoding": text_seconds, "sampling": dict(timer.seconds)})
    write_start = time.perf_counter()
    info = write_video(video, output, fps=fps)
    timings = sidecar["timings_s"]
    timings["write_video"] = time.perf_counter() - write_start
    timings["load"] = dict(pipeline.load_seconds)
    timings["total"] = time.perf_counter() - started
    sidecar.update(peak_memory=_peak_memory(pipeline.device), video=_video_record(info),
                   source={"src_root_path": str(Path(src_root_path).absolute()), "frames": source.num_frames,
                           "height": source.pose.shape[1], "width": source.pose.shape[2]})
    sidecar_path = sidecar_path_for(output)
    write_json(sidecar_path, sidecar)
    return GenerationRecord(output, sidecar_path, None, info, sidecar)
