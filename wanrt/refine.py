"""Refine one: bring a preview candidate, or any video, to full quality.

The source is fitted to the target latent grid (frames trimmed to 4n+1, each frame scaled
to cover the target and centre-cropped), VAE-encoded to x0 and noised on the flow path
`x = (1 - sigma) * x0 + sigma * noise` with the noise `wanrt generate` draws for the seed.
Sampling then runs the rest of the full schedule from there, each step with the expert the
MoE boundary rule gives its timestep, as in a plain generation.

`strength` is the noise level the source is brought to: the run starts at the first step
whose sigma is at most `strength`, so it is never noisier than asked. Strength 1 starts at
step 0 from pure noise, which is exactly `wanrt generate` with that seed (the source then
only sets the frame count, the fps and, for i2v, the first frame); strength 0 starts past
the last step (sigma 0) and returns the source re-encoded, decode(encode(x)).
A noise level rather than diffusers' fraction of the steps, because the Wan schedules
spend most steps at high noise (shift 12 for t2v-A14B): 30% of its 40 steps would start at
sigma 0.86, nearly a new video, while sigma <= 0.3 runs its last step only.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from wanrt.configs import ModelType, TaskSpec
from wanrt.errors import InputError
from wanrt.generate import EmbeddingCache, GenerationRecord, generate_video
from wanrt.hashing import file_sha256
from wanrt.loading.checkpoint import Expert
from wanrt.pipelines import (GenerationRequest, Pipeline, ResolvedRequest, SamplingState, StepInfo,
                            TextEmbeddings)
from wanrt.loading.files import confined_path
from wanrt.preview import INDEX_NAME, PreviewIndex
from wanrt.video_io import read_video

DEFAULT_STRENGTH = 0.8
FIT_MODE = "scale to cover, bicubic (antialiased), centre crop"


def check_strength(strength: float) -> float:
    if not 0.0 <= strength <= 1.0:
        raise InputError(f"--strength {strength} must be between 0 (keep the source) and 1 (a new video)")
    return float(strength)


def start_step(sigmas: Tensor, strength: float) -> int:
    """Index of the first step whose sigma is <= strength (`len(sigmas) - 1` = no step).
    `sigmas` decrease and end in 0, so this is the count of those above `strength`."""
    return int((sigmas > check_strength(strength)).sum())


@dataclass(frozen=True)
class RefineSchedule:
    """The steps a refine runs: `steps[i]` is (timestep, expert) of step `start_step + i`."""

    strength: float
    start_step: int
    total_steps: int
    start_sigma: float  # the noise level the source is brought to
    steps: tuple[tuple[int, Expert], ...]

    def describe(self) -> str:
        if not self.steps:
            return f"no step: strength {self.strength:g} returns the source re-encoded"
        counts = Counter(expert for _, expert in self.steps)
        experts = ", ".join(f"{n} {expert.value.replace('_', '-')}" for expert, n in counts.items()
                            if expert is not Expert.ONLY)
        return (f"steps {self.start_step}..{self.total_steps - 1} of {self.total_steps} from sigma "
                f"{self.start_sigma:.4f}" + (f" ({experts})" if experts else ""))

    def to_dict(self) -> dict[str, Any]:
        return {"strength": self.strength, "start_step": self.start_step, "total_steps": self.total_steps,
                "start_sigma": self.start_sigma,
                "steps": [[timestep, expert.value] for timestep, expert in self.steps]}


def refine_schedule(pipeline: Pipeline, request: ResolvedRequest, strength: float) -> RefineSchedule:
    """What `refine_latents` will run for `request` at `strength`, without running it."""
    scheduler = pipeline.new_scheduler(request)
    first = start_step(scheduler.sigmas, strength)
    steps = tuple((t, pipeline.expert_for(t)) for t in scheduler.timesteps.tolist()[first:])
    return RefineSchedule(float(strength), first, request.steps, scheduler.sigmas[first].item(), steps)


# ---------------------------------------------------------------------- the source


@dataclass(frozen=True)
class RefineSource:
    path: Path
    video: Tensor = dataclasses.field(repr=False)  # [3, T, H, W] in [-1, 1], as decoded
    fps: float
    sha256: str
    preview: Mapping[str, Any] | None = None        # folder, pick, seed when from a preview

    def to_dict(self) -> dict[str, Any]:
        _, frames, height, width = self.video.shape
        return {"path": str(self.path.absolute()), "sha256": self.sha256, "frames": frames,
                "width": width, "height": height, "fps": self.fps,
                "preview": dict(self.preview) if self.preview is not None else None}


def read_source(path: Path, flag: str = "--init-video", preview: Mapping[str, Any] | None = None) -> RefineSource:
    path = Path(path)
    try:
        video, fps = read_video(path)
    except InputError as error:
        raise InputError(f"{flag}: {error}") from None
    return RefineSource(path, video, fps, file_sha256(path), preview)


def read_preview_pick(folder: Path, pick: int) -> tuple[PreviewIndex, RefineSource]:
    """The preview's index and candidate `pick`'s video."""
    index = PreviewIndex.load(folder)
    candidate = index.candidate(pick)
    video = confined_path(index.folder, candidate.video, index.folder / INDEX_NAME, InputError)
    source = read_source(video, flag="--from",
                         preview={"folder": str(index.folder.absolute()), "pick": pick, "seed": candidate.seed})
    return index, source


def refine_frame_count(source_frames: int, frame_num: int | None) -> int:
    """`frame_num`, else the most frames of the source a Wan VAE takes (4n+1)."""
    if frame_num is None:
        return (source_frames - 1) // 4 * 4 + 1
    if frame_num > source_frames:
        raise InputError(f"--frame-num {frame_num} exceeds the source's {source_frames} frames; "
                         "omit it to use the source's")
    return frame_num


def refine_request(task: TaskSpec, request: GenerationRequest, source: RefineSource) -> GenerationRequest:
    """What `request` leaves unset, from the source: the frame count (trimmed to 4n+1) and,
    for i2v, the conditioning image (the source's first frame)."""
    image = request.image
    if image is None and task.dit.model_type is ModelType.I2V:
        image = source.video[:, 0]
    return dataclasses.replace(request, frame_num=refine_frame_count(source.video.shape[1], request.frame_num),
                               image=image)


def fit_frames(video: Tensor, height: int, width: int) -> Tensor:
    """`[3, T, h, w]` -> `[3, T, height, width]`: scaled to cover the target, keeping the
    aspect ratio, then centre-cropped. A source already at the target size is untouched."""
    _, _, source_h, source_w = video.shape
    if (source_h, source_w) == (height, width):
        return video
    scale = max(height / source_h, width / source_w)
    cover_h, cover_w = max(height, round(source_h * scale)), max(width, round(source_w * scale))
    # Bicubic overshoots at edges; the clamp keeps pixels in the VAE's [-1, 1].
    scaled = F.interpolate(video.transpose(0, 1).float(), size=(cover_h, cover_w), mode="bicubic",
                           antialias=True, align_corners=False).clamp(-1, 1).transpose(0, 1)
    top, left = (cover_h - height) // 2, (cover_w - width) // 2
    return scaled[:, :, top:top + height, left:left + width]


# ---------------------------------------------------------------------- sampling


def refine_start(pipeline: Pipeline, request: ResolvedRequest, video: Tensor, strength: float) -> SamplingState:
    """The state a refine of `video` (`[3, frame_num, H, W]` in [-1, 1], any H, W) at
    `strength` continues from: `pipeline.start`'s, moved to the start step with the source
    noised to that step's sigma. At step 0 it is `pipeline.start`'s untouched (pure noise)."""
    state = pipeline.start(request)
    first = start_step(state.scheduler.sigmas, strength)
    if first == 0:
        return state
    _, _, _, lat_h, lat_w = state.latents.shape
    _, stride_h, stride_w = pipeline.task.vae_stride
    pixels = fit_frames(video, lat_h * stride_h, lat_w * stride_w)
    with torch.no_grad():
        x0 = pipeline.vae.encode(pixels[None].to(pipeline.device))
    # A 0-d float32 CPU sigma, as the schedulers compute with; state.latents holds the
    # seed's noise (ti2v's frozen first frame is restored by fix_up).
    sigma = state.scheduler.sigmas[first]
    noised = (1 - sigma) * x0 + sigma * state.latents
    return dataclasses.replace(state, latents=state.conditioning.fix_up(noised), step=first)


def refine_latents(pipeline: Pipeline, request: ResolvedRequest, video: Tensor, strength: float,
                   embeddings: TextEmbeddings, on_step: Callable[[StepInfo], None] | None = None) -> Tensor:
    """Final latents `[C, F, h, w]` (float32, CPU) of refining `video` at `strength`."""
    state = refine_start(pipeline, request, video, strength)
    return pipeline.denoise(state, embeddings, on_step=on_step).latents[0].float().cpu()


def refine_video(pipeline: Pipeline, request: GenerationRequest, source: RefineSource, strength: float,
                 output: Path, *, embedding_cache: EmbeddingCache | None, fps: int | None = None,
                 on_step: Callable[[StepInfo], None] | None = None,
                 on_decode: Callable[[], None] | None = None,
                 run_options: Mapping[str, Any] | None = None) -> GenerationRecord:
    """Refine `source` and write `output` as `wanrt generate` does (mp4, sidecar, latents).

    `request` is completed by `refine_request`; the fps follows the source unless given.
    The sidecar records the source (path, sha256, preview pick), the strength and the steps
    run under options.refine.
    """
    strength = check_strength(strength)
    request = refine_request(pipeline.task, request, source)
    schedule = refine_schedule(pipeline, request.resolved(pipeline.task), strength)
    frame_num = request.frame_num
    video = source.video[:, :frame_num]

    def sample(resolved: ResolvedRequest, embeddings: TextEmbeddings,
               on_step: Callable[[StepInfo], None] | None = None) -> Tensor:
        return refine_latents(pipeline, resolved, video, strength, embeddings, on_step)
    record = {"source": source.to_dict(), "frames_used": frame_num, "fit": FIT_MODE, **schedule.to_dict()}
    return generate_video(pipeline, request, output, embedding_cache=embedding_cache, on_step=on_step,
                          on_decode=on_decode, sample=sample, fps=fps or max(1, round(source.fps)),
                          run_options={**(run_options or {}), "refine": record})
