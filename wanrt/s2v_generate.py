"""One speech-to-video run: check the audio, sample clip by clip, write the mp4 with the
input audio (AAC, trimmed to the video) and its JSON sidecar.

Unlike t2v/i2v/ti2v there is no latents file to finish from: the clip loop itself decodes
every clip, because the next clip's motion latents are the re-encoded last frames.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping

from wanrt.audio import read_audio
from wanrt.generate import (EmbeddingCache, GenerationRecord, _ExpertTimer, _peak_memory, _video_record,
                            check_output_path, run_sidecar, sidecar_path_for, start_run)
from wanrt.hashing import file_sha256, files_under
from wanrt.loading.save import write_json
from wanrt.pipelines.core import StepInfo
from wanrt.pipelines.s2v import S2VPipeline, S2VRequest
from wanrt.video_io import write_video


def generate_s2v_video(pipeline: S2VPipeline, request: S2VRequest, output: Path, *,
                       embedding_cache: EmbeddingCache | None,
                       on_step: Callable[[StepInfo], None] | None = None,
                       on_clip: Callable[[int, int], None] | None = None,
                       run_options: Mapping[str, Any] | None = None) -> GenerationRecord:
    """Generate and write `output`. The audio file's metadata is checked when the request is
    resolved, and the whole file decoded (bounded) before any model loads."""
    started = time.perf_counter()
    output = check_output_path(output)
    request.resolved(pipeline.task)
    audio = read_audio(request.audio)
    resolved, seed_was_random, embeddings, cache_state, text_seconds = start_run(pipeline, request, embedding_cache)
    timer = _ExpertTimer(on_step)
    video = pipeline.generate(resolved, embeddings, on_step=timer, on_clip=on_clip)
    fps = pipeline.task.sample.fps
    sidecar = run_sidecar(pipeline, resolved, seed_was_random, fps, cache_state, run_options,
                          {"text_encoding": text_seconds, "sampling": dict(timer.seconds)})
    wav2vec = pipeline.files.root / pipeline.task.extras["wav2vec"]
    sidecar["checkpoint"]["sha256"].update(
        {path.relative_to(pipeline.files.root).as_posix(): file_sha256(path) for path in files_under(wav2vec)})

    write_start = time.perf_counter()
    info = write_video(video, output, fps=fps, audio=audio)
    timings = sidecar["timings_s"]
    timings["write_video"] = time.perf_counter() - write_start
    timings["load"] = dict(pipeline.load_seconds)
    timings["total"] = time.perf_counter() - started
    sidecar.update(peak_memory=_peak_memory(pipeline.device), video=_video_record(info),
                   audio={"path": str(resolved.audio.absolute()), "seconds": audio.seconds,
                          "seconds_in_video": min(audio.seconds, info.frames / fps)})
    sidecar_path = sidecar_path_for(output)
    write_json(sidecar_path, sidecar)
    return GenerationRecord(output, sidecar_path, None, info, sidecar)
