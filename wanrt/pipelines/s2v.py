"""Speech-to-video (S2V-14B) sampling as the official `wan/speech2video.py` runs it.

The video is made clip by clip (`infer_frames` frames each, 80 by default), for as many
clips as the audio covers (`--num_clip` can only lower that):
- the output size is the reference image fitted within the size's area, sides multiples
  of 64, and the image is resized (short side) and center-cropped to it;
- the reference latents are the VAE encoding of that image; the motion latents are the
  encoding of the last 73 generated frames (black before the first clip, whose motion
  tokens are dropped: `drop_first_motion`);
- each clip's noise comes from seed + clip index; CFG is `u + 4.5 (c - u)` where the
  unconditional forward has the negative prompt and zero audio, the same ref/motion/pose;
- a clip is decoded together with the latents before it (the ref latent for the first
  clip, the motion latents after), and its last `infer_frames` frames kept (3 fewer for
  the first clip); its last 73 frames, re-encoded, are the next clip's motion latents.
A pose video (`--pose_video`) is read from its start at 16 fps, resized and cropped the
same way, padded with -1 frames, and encoded per clip with its first frame repeated in front.
The step loop, guidance, DiT loading, streaming, planning and precision are `Pipeline`'s.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import av
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from wanrt.audio import SpeechFeatureExtractor, encode_speech, probe_audio
from wanrt.configs import SIZES, TaskSpec, parse_size
from wanrt.errors import InputError, parse_choice
from wanrt.loading.checkpoint import Expert, check_checkpoint
from wanrt.loading.s2v import load_s2v_dit
from wanrt.models.s2v_dit import WanS2VDiT
from wanrt.pipelines.core import StepInfo, TextEmbeddings, noise_for, run_steps
from wanrt.pipelines.video import Pipeline, resolve_size, resolve_steps
from wanrt.request_checks import check_guide_scale, check_shift, check_text
from wanrt.runtime.planner import MemoryPlan, make_plan, require_fit
from wanrt.schedulers import Solver

# Output sides are multiples of this (official `get_size_less_than_area`).
SIZE_DIVISOR = 64
# With --start_from_ref the reference image fills the newest motion frames.
REF_MOTION_FRAMES = 6
# The VAE's first decoded latent is the ref (or a motion) frame; its 4 frames minus the
# one the causal VAE gives the first latent leave 3 frames to drop from the first clip.
FIRST_CLIP_DROPPED_FRAMES = 3


@dataclass(frozen=True)
class S2VRequest:
    """What the user asked for; unset values take the official defaults. The image is
    fitted within the area of `size`."""

    prompt: str
    image: Tensor = field(repr=False)  # [3, H, W] in [-1, 1]
    audio: Path
    pose_video: Path | None = None
    num_clip: int | None = None
    infer_frames: int | None = None
    size: str | None = None
    steps: int | None = None
    shift: float | None = None
    guide_scale: float | None = None
    solver: str = Solver.UNIPC.value
    seed: int = 0
    negative_prompt: str | None = None
    start_from_ref: bool = False

    def resolved(self, task: TaskSpec) -> "S2VResolved":
        defaults = task.sample
        size = resolve_size(task, self.size)
        infer_frames = task.extras["infer_frames"] if self.infer_frames is None else self.infer_frames
        if infer_frames < 4 or infer_frames % 4:
            raise InputError(f"--infer_frames {infer_frames} must be a positive multiple of 4 (e.g. 48, 80)")
        if self.num_clip is not None and self.num_clip < 1:
            raise InputError(f"--num_clip {self.num_clip} must be at least 1 (default: as many as the audio covers)")
        steps = resolve_steps(task.sample, self.steps)
        probe_audio(Path(self.audio))
        if self.pose_video is not None and not Path(self.pose_video).is_file():
            raise InputError(f"--pose_video {self.pose_video} does not exist or is not a file")
        guide = defaults.guide_scale[0] if self.guide_scale is None else self.guide_scale
        if isinstance(guide, tuple):
            if guide[0] != guide[1]:
                raise InputError(f"--guide-scale {guide} gives two experts' scales; {task.name} takes one number")
            guide = guide[0]
        solver = parse_choice(Solver, self.solver, "--solver")
        if solver is Solver.DISTILL:
            raise InputError(f"--sampler distill needs a distilled model; none exists for {task.name}, "
                             "use unipc or dpm++")
        return S2VResolved(
            prompt=check_text(self.prompt, "--prompt"), image=self.image, audio=Path(self.audio),
            pose_video=self.pose_video, num_clip=self.num_clip, infer_frames=infer_frames, size=size, steps=steps,
            shift=check_shift(defaults.shift if self.shift is None else self.shift),
            guide_scale=check_guide_scale((float(guide), float(guide)))[0], solver=solver, seed=self.seed,
            negative_prompt=check_text(self.negative_prompt or defaults.negative_prompt, "--negative-prompt"),
            start_from_ref=self.start_from_ref)


@dataclass(frozen=True)
class S2VResolved:
    prompt: str
    image: Tensor = field(repr=False)
    audio: Path
    pose_video: Path | None
    num_clip: int | None
    infer_frames: int
    size: str
    steps: int
    shift: float
    guide_scale: float
    solver: Solver
    seed: int
    negative_prompt: str
    start_from_ref: bool
    denoising_steps: None = None  # no distilled S2V model exists: the full-step samplers only

    def resolved(self, task: TaskSpec) -> "S2VResolved":
        return self

    def settings(self) -> dict:
        """JSON-serialisable record of the run options."""
        return {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "size": self.size,
                "audio": str(self.audio), "pose_video": str(self.pose_video) if self.pose_video else None,
                "num_clip": self.num_clip, "infer_frames": self.infer_frames, "steps": self.steps,
                "shift": self.shift, "guide_scale": self.guide_scale, "solver": self.solver.value,
                "seed": self.seed, "start_from_ref": self.start_from_ref}


def s2v_output_size(height: int, width: int, max_area: int, divisor: int = SIZE_DIVISOR) -> tuple[int, int]:
    """(H, W): the largest scale of the image whose sides, padded up to multiples of 64,
    stay within `max_area` (official `get_size_less_than_area`, its 100-step search)."""
    if height * width <= max_area:
        min_scale, max_scale = 0.1, 1.0
    else:
        pad = divisor - 1
        b, a, c = pad * (height + width), height * width, pad ** 2 - max_area
        min_scale = (-b + math.sqrt(b ** 2 - 2 * a * c)) / (2 * a)
        max_scale = math.sqrt(max_area / (height * width))
    for i in range(100):
        scale = max_scale - (max_scale - min_scale) * i / 100
        padded_h, padded_w = (-(-int(side * scale) // SIZE_DIVISOR) * SIZE_DIVISOR for side in (height, width))
        if padded_h * padded_w <= max_area:
            return padded_h, padded_w
    aspect = width / height
    target_w = int((max_area * aspect) ** 0.5 // divisor * divisor)
    target_h = int((max_area / aspect) ** 0.5 // divisor * divisor)
    if target_w >= width or target_h >= height:
        target_w, target_h = int(width // divisor * divisor), int(height // divisor * divisor)
    return target_h, target_w


def _short_side_size(height: int, width: int, short: int) -> tuple[int, int]:
    """torchvision `Resize(short)`: the short side to `short`, the long one truncated."""
    if height <= width:
        return short, int(short * width / height)
    return int(short * height / width), short


def _center_crop_offset(size: int, out: int) -> int:
    """torchvision `CenterCrop`'s start along one side; negative where it pads (zeros, the
    padding split as `(out - size) // 2` before): a 16:9 image resized for a 1280x704 video
    is 1251 wide and gets 14 columns of padding on the left."""
    if out > size:
        return -((out - size) // 2)
    return int(round((size - out) / 2.0))


def fit_reference_image(image: Tensor, height: int, width: int) -> Tensor:
    """The official ref-image path on PIL: `Resize(min(H, W))` (bilinear), `CenterCrop((H, W))`,
    `ToTensor() * 2 - 1`. `image` is `[3, h, w]` in [-1, 1] from `load_image` (exact uint8s)."""
    from PIL import Image

    pixels = ((image.clamp(-1, 1) * 0.5 + 0.5) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    picture = Image.fromarray(pixels)
    new_h, new_w = _short_side_size(picture.height, picture.width, min(height, width))
    picture = picture.resize((new_w, new_h), Image.BILINEAR)
    # PIL fills outside the image with 0, as torchvision's padding of a PIL image.
    top, left = _center_crop_offset(new_h, height), _center_crop_offset(new_w, width)
    picture = picture.crop((left, top, left + width, top + height))
    array = torch.from_numpy(np.asarray(picture, dtype=np.uint8).copy()).permute(2, 0, 1)
    return array.float().div(255) * 2 - 1.0


def fit_pose_frames(frames: Tensor, height: int, width: int) -> Tensor:
    """`[T, 3, h, w]` in [-1, 1] -> `[T, 3, H, W]`: torchvision's tensor `Resize(min(H, W))`
    (bilinear, antialiased) and `CenterCrop((H, W))`."""
    new_h, new_w = _short_side_size(frames.shape[2], frames.shape[3], min(height, width))
    resized = F.interpolate(frames, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top, left = _center_crop_offset(new_h, height), _center_crop_offset(new_w, width)
    # Padding is 0 in the [-1, 1] values the official code crops (mid gray).
    padded = F.pad(resized, (max(0, -left), max(0, width - new_w + left), max(0, -top), max(0, height - new_h + top)))
    top, left = max(0, top), max(0, left)
    return padded[:, :, top:top + height, left:left + width]


def read_pose_frames(path: Path, count: int, fps: int) -> Tensor:
    """The first `count` frames of `path` sampled at about `fps` (every round(rate/fps)-th
    frame, official `read_last_n_frames(reverse=True)`), `[T <= count, 3, h, w]` in [-1, 1].
    Decoding stops once `count` frames are taken."""
    images = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"--pose_video {path} has no video stream; pass an mp4 of the pose sequence")
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or fps)
            interval = max(1, round(rate / fps))
            for index, frame in enumerate(container.decode(stream)):
                if index % interval == 0:
                    images.append(frame.to_ndarray(format="rgb24"))
                    if len(images) == count:
                        break
    except av.error.FFmpegError as error:
        raise InputError(f"--pose_video {path} cannot be decoded ({str(error).strip()[:120]}); "
                         "re-export it as mp4") from None
    if not images:
        raise InputError(f"--pose_video {path} has no decodable frames; re-export it as mp4")
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return pixels.float() / 255.0 * 2 - 1.0


def _numbered_over_clips(on_step: Callable[[StepInfo], None] | None, clip: int,
                         clips: int) -> Callable[[StepInfo], None] | None:
    """A step callback that numbers the steps of all clips as one run."""
    if on_step is None:
        return None

    def numbered(info: StepInfo) -> None:
        on_step(dataclasses.replace(info, index=info.index + clip * info.total, total=info.total * clips))
    return numbered


@dataclass
class _ClipInputs:
    """The DiT's inputs of one clip besides the noisy latents."""

    ref_latents: Tensor
    motion_latents: Tensor
    cond_states: Tensor
    audio: Tensor
    drop_motion: bool


class S2VPipeline(Pipeline):
    """`Pipeline` for s2v tasks: the S2V DiT, the wav2vec2 audio model and the clip loop."""

    def check_files(self) -> None:
        """The S2V DiT is checked by its own strict loader as it loads; the VAE, T5 and
        tokenizer as for every task."""
        check_checkpoint(self._require_files(), self.task, check_dits=False)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._speech: SpeechFeatureExtractor | None = None

    def read_dit(self, folder: Path, leave_in_file: Callable[[str], bool] | None = None) -> WanS2VDiT:
        if leave_in_file is not None:
            raise InputError(f"{self.task.name}: RAM mode stream-file is not supported for the S2V DiT yet; "
                             "give more --ram or --precision fp8")
        return load_s2v_dit(folder, expect=self.task.dit, dtype=self.dit_dtype)

    @property
    def speech_features(self) -> SpeechFeatureExtractor:
        if self._speech is None:
            folder = self._require_files().root / self.task.extras["wav2vec"]
            self._speech = self._timed_load("wav2vec", lambda: SpeechFeatureExtractor(folder, self.device))
        return self._speech

    @property
    def motion_frames(self) -> tuple[int, int]:
        """(pixel frames, latent frames) of the motion context: (73, 19)."""
        frames = self.task.extras["motion_frames"]
        return frames, (frames + self.task.vae_stride[0] - 1) // self.task.vae_stride[0]

    def output_size(self, request: S2VResolved) -> tuple[int, int]:
        width, height = SIZES.get(request.size) or parse_size(request.size)
        return s2v_output_size(request.image.shape[1], request.image.shape[2], width * height)

    def plan_run(self, request: S2VResolved) -> MemoryPlan | None:  # type: ignore[override]
        """Plan one clip's forward: x plus ref and motion tokens, about 3 latent frames more."""
        if self.memory is None or self.dit_dtype != torch.bfloat16:
            return None
        height, width = self.output_size(request)
        frames = request.infer_frames + 3 * self.task.vae_stride[0] + 1
        return self.adopt_plan(require_fit(make_plan(self.task, f"{width}*{height}", frames, self.precision,
                                                     self.memory.vram_gib, self.memory.ram_gib,
                                                     t5_cpu=self.text_device.type == "cpu")))

    def _as_official_pixels(self, pixels: Tensor) -> Tensor:
        """The official pipeline holds the pose pixels and the first motion frames (black,
        or the ref image) in the DiT's dtype (bf16 on GPU); the generated frames that join
        them later stay float32. A no-op in float32."""
        return pixels.to(self.dit_dtype).float()

    def _pose_latents(self, request: S2VResolved, clips: int, height: int, width: int) -> list[Tensor]:
        infer = request.infer_frames
        frames = fit_pose_frames(read_pose_frames(request.pose_video, infer * clips, self.task.sample.fps),
                                 height, width)
        padding = -torch.ones(clips * infer - frames.shape[0], 3, height, width)
        video = torch.cat([frames, padding]).transpose(0, 1)[None]
        latents = []
        for clip in video.chunk(clips, dim=2):
            with_first = torch.cat([clip[:, :, :1], clip], dim=2)
            latents.append(self.vae.encode(self._as_official_pixels(with_first.to(self.device)))[:, :, 1:].cpu())
        return latents

    def generate(self, request: S2VResolved, embeddings: TextEmbeddings,
                 on_step: Callable[[StepInfo], None] | None = None,
                 on_clip: Callable[[int, int], None] | None = None) -> Tensor:
        """The whole video `[3, T, H, W]` in [-1, 1] (float32, CPU)."""
        if self.plan is None:
            self.plan_run(request)
        infer = request.infer_frames
        motion_frames, motion_latent_frames = self.motion_frames
        height, width = self.output_size(request)
        audio, clips_in_audio = encode_speech(request.audio, self.speech_features, self.task.sample.fps, infer)
        clips = min(request.num_clip or clips_in_audio, clips_in_audio)
        drop_first_motion = self.task.extras["drop_first_motion"] and not request.start_from_ref

        with torch.no_grad():
            ref_pixels = fit_reference_image(request.image, height, width)[None, :, None].to(self.device)
            ref_latents = self.vae.encode(ref_pixels)
            recent = torch.zeros(1, 3, motion_frames, height, width, device=self.device)
            if request.start_from_ref:
                recent[:, :, -REF_MOTION_FRAMES:] = ref_pixels
            recent = self._as_official_pixels(recent)
            motion_latents = self.vae.encode(recent)
            pose = self._pose_latents(request, clips, height, width) if request.pose_video else None

        stride_t, stride_h, stride_w = self.task.vae_stride
        latent_frames = (infer + stride_t - 1 + motion_frames) // stride_t - motion_latent_frames
        shape = (self.task.vae.z_dim, latent_frames, height // stride_h, width // stride_w)
        video = []
        for clip in range(clips):
            if on_clip is not None:
                on_clip(clip, clips)
            drop = drop_first_motion and clip == 0
            inputs = _ClipInputs(
                ref_latents, motion_latents,
                pose[clip].to(self.device) if pose is not None else torch.zeros(1, *shape, device=self.device),
                audio[..., clip * infer:(clip + 1) * infer].to(self.device), drop)
            latents = self._denoise_clip(request, embeddings, noise_for(shape, request.seed + clip)[None], inputs,
                                         _numbered_over_clips(on_step, clip, clips))
            self.offload_dit()
            with torch.no_grad():
                context = ref_latents if drop else motion_latents
                frames = self.vae.decode(torch.cat([context, latents], dim=2))[:, :, -infer:]
                if drop:
                    frames = frames[:, :, FIRST_CLIP_DROPPED_FRAMES:]
                video.append(frames[0].float().cpu())
                if clip + 1 < clips:
                    overlap = min(motion_frames, frames.shape[2])
                    recent = torch.cat([recent[:, :, overlap:], frames[:, :, -overlap:]], dim=2)
                    motion_latents = self.vae.encode(recent)
        return torch.cat(video, dim=1)

    def _denoise_clip(self, request: S2VResolved, embeddings: TextEmbeddings, noise: Tensor,
                      inputs: _ClipInputs, on_step: Callable[[StepInfo], None]) -> Tensor:
        scheduler = self.new_scheduler(request)
        steps = [(t, Expert.ONLY) for t in scheduler.timesteps.tolist()]
        self._load_expert(Expert.ONLY)
        if self._streamer is not None:
            for _ in range(len(steps) * self.guidance.forwards_for(request.guide_scale)):
                self._streamer.expect_forward(Expert.ONLY)
        cond = (embeddings.cond[None].to(self.device), inputs.audio)
        uncond = (embeddings.uncond[None].to(self.device), torch.zeros_like(inputs.audio))
        motion_frames = self.motion_frames

        def forward(latents: Tensor, timestep: Tensor, branch: tuple[Tensor, Tensor], y=None) -> Tensor:
            context, audio = branch
            self.dit_forwards += 1
            return self._runners[Expert.ONLY](latents, timestep, context, inputs.ref_latents, inputs.motion_latents,
                                              inputs.cond_states, audio, motion_frames, inputs.drop_motion)

        def predict(t: int, expert: Expert, latents: Tensor) -> tuple[Tensor, float]:
            self.dit(expert)
            timestep = torch.tensor([t], device=self.device)
            return self.guidance(forward, latents, timestep, cond, uncond, None, request.guide_scale), \
                request.guide_scale

        autocast = torch.autocast(self.device.type, dtype=self.dit_dtype, enabled=self.dit_dtype != torch.float32)
        with torch.no_grad(), autocast:
            return run_steps(steps, 0, scheduler, noise.to(self.device), predict, on_step=on_step)
