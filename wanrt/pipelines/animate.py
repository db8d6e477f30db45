"""Wan2.2-Animate: character animation and replacement, as the official `wan/animate.py`.

The input is the folder the official preprocessor writes (`src_root_path`): `src_pose.mp4`
(rendered skeletons, which set the output size and length), `src_face.mp4` (face crops),
`src_ref.png` (the character), and for replacement `src_bg.mp4` (the video with the person
removed) and `src_mask.mp4` (1 where the person is).

Official rules reproduced here:
- the video is cut into `clip_len` (77) frame segments that overlap by `refert_num` (1 or 5)
  frames; the inputs are first padded to a whole number of segments by playing them back
  and forth (`inputs_padding`), and the output is cut back to the input length;
- each segment samples `[16, 1 + lat_t, h, w]` latents: latent frame 0 is the reference
  image, conditioned with mask 1; the rest follow the pose latents (`pose_patch_embedding`)
  and the face crops (face adapters);
- `y` of the first animation segment is VAE(black video) with mask 0; in replacement it is
  VAE(background) with mask `1 - person mask`; later segments carry the last `refert_num`
  generated frames (mask 1) into the start of the next;
- CFG (scale > 1 only; default 1 = one forward per step) pairs the null text with the face
  crops set to -1; the reference latent frame is dropped before decoding.
Noise comes from one CPU generator seeded once, so a seed gives the same video on any device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from wanrt.configs import TaskSpec
from wanrt.errors import CheckpointError, InputError, parse_choice
from wanrt.loading.checkpoint import (Expert, check_checkpoint, load_animate_dit, load_clip_vision,
                                      read_animate_widths)
from wanrt.lora import LoraSpec, parameter_shapes
from wanrt.models.animate_dit import AnimateDiT, AnimateWidths
from wanrt.pipelines.core import StepInfo, TextEmbeddings, run_steps
from wanrt.pipelines.video import Pipeline
from wanrt.request_checks import check_guide_scale, check_shift, check_text
from wanrt.runtime.planner import MemoryPlan, make_plan, require_fit
from wanrt.schedulers import Solver, make_scheduler
from wanrt.video_io import load_image_uint8, read_video_uint8

SOURCE_FILES = {"pose": "src_pose.mp4", "face": "src_face.mp4", "ref": "src_ref.png",
                "bg": "src_bg.mp4", "mask": "src_mask.mp4"}
REFERT_NUMS = (1, 5)
# A face crop of -1 everywhere is the official unconditional face (CFG).
UNCOND_FACE_VALUE = -1.0


@dataclass(frozen=True)
class AnimateSource:
    """The preprocessed inputs, as decoded frames (uint8 RGB, `[T, H, W, 3]`)."""

    pose: Tensor
    face: Tensor
    ref: Tensor                  # [H, W, 3], letterboxed to the pose size
    bg: Tensor | None = None
    mask: Tensor | None = None   # [T, H, W] float64 in [0, 1]: 1 = the person

    @property
    def replace(self) -> bool:
        return self.bg is not None

    @property
    def num_frames(self) -> int:
        return self.pose.shape[0]


def read_source(root: Path, replace: bool) -> AnimateSource:
    """Read a `src_root_path` folder; every problem is one line naming the file."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"--src_root_path {root} is not a folder; give the folder written by the official "
                         "Wan2.2-Animate preprocess_data.py")
    needed = ("pose", "face", "ref") + (("bg", "mask") if replace else ())
    missing = [SOURCE_FILES[name] for name in needed if not (root / SOURCE_FILES[name]).is_file()]
    if missing:
        hint = " (replacement needs the preprocessor's --replace_flag outputs)" if replace else ""
        raise InputError(f"--src_root_path {root} lacks {', '.join(missing)}{hint}")
    pose, _ = read_video_uint8(root / SOURCE_FILES["pose"])
    face, _ = read_video_uint8(root / SOURCE_FILES["face"])
    height, width = pose.shape[1:3]
    ref = letterbox(load_image_uint8(root / SOURCE_FILES["ref"]), height, width)
    bg = mask = None
    if replace:
        bg, _ = read_video_uint8(root / SOURCE_FILES["bg"])
        mask_frames, _ = read_video_uint8(root / SOURCE_FILES["mask"])
        for name, frames in (("bg", bg), ("mask", mask_frames)):
            if frames.shape[1:3] != (height, width):
                raise InputError(f"{root / SOURCE_FILES[name]} is {frames.shape[2]}x{frames.shape[1]} but "
                                 f"src_pose.mp4 is {width}x{height}; preprocess them together")
        # The official mask is the first channel of the decoded mask video, / 255.
        mask = mask_frames[..., 0].double() / 255
    return AnimateSource(pose, face, ref, bg, mask)


def letterbox(image: Tensor, height: int, width: int) -> Tensor:
    """Official `padding_resize`: fit `image [h, w, 3]` uint8 inside height x width keeping
    its aspect ratio, centred on black. The resize is bilinear without antialiasing (cv2's
    INTER_LINEAR up to ±1 rounding; exact when the size does not change, the usual case
    since the preprocessor writes the reference at the pose size)."""
    src_h, src_w = image.shape[:2]
    if src_h / src_w > height / width:
        new_h, new_w = height, int(height / src_h * src_w)
    else:
        new_h, new_w = int(width / src_w * src_h), width
    resized = image
    if (new_h, new_w) != (src_h, src_w):
        scaled = F.interpolate(image.permute(2, 0, 1)[None].float(), size=(new_h, new_w), mode="bilinear",
                               align_corners=False)
        resized = scaled[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
    canvas = torch.zeros(height, width, 3, dtype=torch.uint8)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = resized
    return canvas


def padded_length(num_frames: int, clip_len: int, refert_num: int) -> int:
    """Official `get_valid_len`: frames after padding to whole overlapping segments."""
    stride = clip_len - refert_num
    remainder = (num_frames - refert_num) % stride
    return num_frames + (stride - remainder if remainder else 0)


def ping_pong_indices(num_frames: int, target_len: int) -> list[int]:
    """Official `inputs_padding`: frame indices walking forwards and back, 0 1 .. n-1 n-2 .. 0 1 .."""
    indices, index, backwards = [], 0, False
    while len(indices) < target_len:
        indices.append(index)
        index += -1 if backwards else 1
        if index in (0, num_frames - 1):
            backwards = not backwards
    return indices


def i2v_mask(lat_t: int, lat_h: int, lat_w: int, mask_len: int, pixel_mask: Tensor | None = None) -> Tensor:
    """Official `get_i2v_mask`: per-pixel-frame mask `[1, T, h, w]` (zeros by default) with
    its first `mask_len` frames set to 1, the first frame repeated 4x, folded into
    `[4, lat_t, h, w]` channels."""
    mask = torch.zeros(1, (lat_t - 1) * 4 + 1, lat_h, lat_w) if pixel_mask is None else pixel_mask.clone()
    mask[:, :mask_len] = 1
    mask = torch.cat([mask[:, :1].repeat_interleave(4, dim=1), mask[:, 1:]], dim=1)
    return mask.view(mask.shape[1] // 4, 4, lat_h, lat_w).transpose(0, 1)


def signed_unit(frames: Tensor) -> Tensor:
    """uint8 `[T, H, W, 3]` -> `[3, T, H, W]` as the official `u8 / 127.5 - 1` in float64."""
    return (frames.double() / 127.5 - 1).permute(3, 0, 1, 2)


@dataclass(frozen=True)
class AnimateRequest:
    """One animation run; unset values take the task's official defaults."""

    replace: bool = False
    refert_num: int = 1
    clip_len: int | None = None
    steps: int | None = None
    shift: float | None = None
    guide_scale: float | None = None
    solver: str = Solver.UNIPC.value
    seed: int = 0
    prompt: str | None = None
    negative_prompt: str | None = None

    def resolved(self, task: TaskSpec) -> "AnimateRequest":
        """Defaults filled in and every value checked (one line naming the flag)."""
        parse_choice(Solver, self.solver, "--sample_solver")
        if self.solver == Solver.DISTILL.value:
            raise InputError("--sample_solver distill is for step-distilled t2v/i2v models; use unipc or dpm++")
        if self.refert_num not in REFERT_NUMS:
            raise InputError(f"--refert_num {self.refert_num} must be 1 or 5 (frames carried into the next segment)")
        clip_len = task.sample.frame_num if self.clip_len is None else self.clip_len
        if clip_len < 5 or (clip_len - 1) % task.vae_stride[0] or clip_len <= self.refert_num:
            raise InputError(f"--frame_num {clip_len} must be 4n+1, at least 5 and more than --refert_num")
        if self.guide_scale is not None and not isinstance(self.guide_scale, (int, float)):
            raise InputError(f"--sample_guide_scale {self.guide_scale} must be one number for Animate (one DiT)")
        steps = task.sample.steps if self.steps is None else self.steps
        if steps < 1:
            raise InputError(f"--sample_steps {steps} must be at least 1")
        guide_scale = task.sample.guide_scale[0] if self.guide_scale is None else float(self.guide_scale)
        return AnimateRequest(
            replace=self.replace, refert_num=self.refert_num, clip_len=clip_len, steps=steps,
            shift=check_shift(task.sample.shift if self.shift is None else self.shift),
            guide_scale=check_guide_scale((guide_scale, guide_scale))[0], solver=self.solver, seed=self.seed,
            # The official generate.py never passes a prompt to Animate: the config's is used.
            prompt=check_text(self.prompt or task.extras["default_prompt"], "--prompt"),
            negative_prompt=check_text(self.negative_prompt or task.sample.negative_prompt, "--negative-prompt"))

    @property
    def image(self) -> None:
        """No separate image: the reference image is `src_ref.png` of the source folder."""
        return None

    def settings(self) -> dict:
        return {"replace_flag": self.replace, "refert_num": self.refert_num, "frame_num": self.clip_len,
                "steps": self.steps, "shift": self.shift, "guide_scale": self.guide_scale, "solver": self.solver,
                "seed": self.seed, "prompt": self.prompt, "negative_prompt": self.negative_prompt}


@dataclass
class _Segment:
    """The DiT inputs of one segment besides the latents (batch of 1)."""

    y: Tensor
    clip_features: Tensor
    pose_latents: Tensor
    face: Tensor


class AnimatePipeline(Pipeline):
    """`Pipeline` (component loading, LoRA merge, precision, planner, streaming) with the
    Animate DiT, the CLIP image tower and the official segment loop."""

    def check_files(self) -> None:
        """The Animate DiT is checked by its own strict loader as it loads; the VAE, T5 and
        tokenizer as for every task."""
        check_checkpoint(self._require_files(), self.task, check_dits=False)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._clip = None

    @staticmethod
    def _dit_shapes(task: TaskSpec) -> dict[str, tuple[int, ...]]:
        # LoRAs are checked against the blocks, whose shapes the widths never change.
        with torch.device("meta"):
            return parameter_shapes(AnimateDiT(task.dit, AnimateWidths()))

    @classmethod
    def from_pretrained(cls, ckpt_dir, task: str, *args, use_relighting_lora: bool = False,
                        **kwargs) -> "AnimatePipeline":
        """As `Pipeline.from_pretrained`; `use_relighting_lora` merges the checkpoint's
        `relighting_lora.ckpt` (the official `--use_relighting_lora`)."""
        from wanrt.configs import get_task

        loras = list(kwargs.pop("loras", ()))
        if use_relighting_lora:
            path = Path(ckpt_dir) / get_task(task).extras["lora_checkpoint"]
            if not path.is_file():
                raise CheckpointError(f"{path}: --use_relighting_lora needs the relighting LoRA in the checkpoint folder")
            loras.append(LoraSpec(path))
        return super().from_pretrained(ckpt_dir, task, *args, loras=loras, **kwargs)

    def read_dit(self, folder: Path, leave_in_file: Callable[[str], bool] | None = None) -> AnimateDiT:
        if leave_in_file is not None:
            raise InputError(f"{self.task.name}: RAM mode stream-file is not supported for the Animate DiT yet; "
                             "give more --ram or --precision fp8")
        return load_animate_dit(folder, expect=self.task.dit, dtype=self.dit_dtype)

    @property
    def clip(self):
        """The CLIP image tower (float16 on a GPU, as the official; float32 on the CPU)."""
        if self._clip is None:
            path = self._require_files().root / self.task.extras["clip_checkpoint"]
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
            self._clip = self._timed_load("clip", lambda: load_clip_vision(
                path, num_heads=self.task.extras["clip_heads"], dtype=dtype))
        return self._clip.to(self.device)

    def face_size(self) -> int:
        """Side of the face crops the DiT takes, without loading it when not loaded yet."""
        if Expert.ONLY in self._experts:
            return self._experts[Expert.ONLY].widths.face_size
        return read_animate_widths(self._require_files().dit_dirs[Expert.ONLY]).face_size

    def plan_animation(self, request: AnimateRequest, height: int, width: int) -> MemoryPlan | None:
        """Plan one segment's forward: the clip plus the reference latent frame."""
        if self.memory is None or self.dit_dtype != torch.bfloat16:
            return None
        frames = request.clip_len + self.task.vae_stride[0]
        return self.adopt_plan(require_fit(make_plan(self.task, f"{width}*{height}", frames, self.precision,
                                                     self.memory.vram_gib, self.memory.ram_gib, image=True,
                                                     t5_cpu=self.text_device.type == "cpu")))

    # ------------------------------------------------------------------ the run

    def check_source(self, source: AnimateSource, request: AnimateRequest) -> None:
        """Refuse inputs the model cannot take, before any sampling."""
        height, width = source.pose.shape[1:3]
        multiple = self.task.vae_stride[1] * self.task.dit.patch_size[1]
        if height % multiple or width % multiple:
            raise InputError(f"src_pose.mp4 is {width}x{height}; Animate needs both sides to be multiples of "
                             f"{multiple} (re-run the preprocessor with such a --resolution_area)")
        face_size = self.face_size()
        if tuple(source.face.shape[1:3]) != (face_size, face_size):
            raise InputError(f"src_face.mp4 frames are {source.face.shape[2]}x{source.face.shape[1]}; this model "
                             f"takes {face_size}x{face_size} face crops")
        if source.num_frames <= request.refert_num:
            raise InputError(f"src_pose.mp4 has {source.num_frames} frame(s); Animate needs more than "
                             f"--refert_num {request.refert_num}")
        for name, frames in (("face", source.face), ("bg", source.bg), ("mask", source.mask)):
            if frames is not None and len(frames) != source.num_frames:
                raise InputError(f"{SOURCE_FILES[name]} has {len(frames)} frames but src_pose.mp4 has "
                                 f"{source.num_frames}; preprocess them together")

    def animate(self, request: AnimateRequest, source: AnimateSource, embeddings: TextEmbeddings | None = None,
                on_step: Callable[[StepInfo], None] | None = None) -> Tensor:
        """The whole video `[3, T, H, W]` in [-1, 1] (float32, CPU), T = the pose frames."""
        request = request.resolved(self.task)
        if request.replace != source.replace:
            raise InputError("--replace_flag needs src_bg.mp4 and src_mask.mp4 read for replacement")
        self.check_source(source, request)
        if self.plan is None:  # before the DiT loads: the plan decides what streams
            self.plan_animation(request, *source.pose.shape[1:3])
        if embeddings is None:
            embeddings = self.encode_text(request.prompt, request.negative_prompt)
        clip_len, refert_num = request.clip_len, request.refert_num
        target_len = padded_length(source.num_frames, clip_len, refert_num)
        indices = {name: ping_pong_indices(len(frames), target_len)
                   for name, frames in (("pose", source.pose), ("face", source.face), ("bg", source.bg),
                                        ("mask", source.mask)) if frames is not None}
        generator = torch.Generator().manual_seed(request.seed)
        self.dit_forwards = 0
        outputs, previous = [], None
        for start in range(0, target_len - refert_num, clip_len - refert_num):
            window = {name: idx[start:start + clip_len] for name, idx in indices.items()}
            frames = self._sample_segment(request, source, window, previous, embeddings, generator, on_step)
            previous = frames[:, -refert_num:]
            outputs.append(frames if start == 0 else frames[:, refert_num:])
        return torch.cat(outputs, dim=1)[:, :source.num_frames]

    def _segment_inputs(self, request: AnimateRequest, source: AnimateSource, window: dict[str, list[int]],
                        previous: Tensor | None) -> _Segment:
        dtype = self.dit_dtype
        height, width = source.pose.shape[1:3]
        _, stride_h, stride_w = self.task.vae_stride
        lat_h, lat_w, lat_t = height // stride_h, width // stride_w, request.clip_len // 4 + 1
        vae = self.vae

        def encode(pixels: Tensor) -> Tensor:
            # The official casts every pixel input to the DiT dtype before the VAE.
            return vae.encode(pixels.to(dtype).float()[None].to(self.device))[0]
        with torch.no_grad():
            pose_latents = encode(signed_unit(source.pose[window["pose"]]))
            ref = signed_unit(source.ref[None])                                  # [3, 1, H, W]
            y_ref = torch.cat([i2v_mask(1, lat_h, lat_w, 1).to(self.device), encode(ref)])
            clip_features = self.clip.encode(ref[:, 0][None].to(self.device, self.clip.patch_embedding.weight.dtype))
            carried = 0 if previous is None else request.refert_num
            if request.replace:
                person = torch.from_numpy(source.mask.numpy()[window["mask"]])[None, :, None]   # [1, T, 1, H, W]
                # 1 - mask in the DiT dtype, as the official (its batch is cast before).
                keep = F.interpolate((1 - person.to(dtype))[0].float(), size=(lat_h, lat_w), mode="nearest")
                mask = i2v_mask(lat_t, lat_h, lat_w, carried, pixel_mask=keep[:, 0][None])
                video = signed_unit(source.bg[window["bg"]])
                if previous is not None:
                    video = torch.cat([previous.double(), video[:, carried:]], dim=1)
            else:
                mask = i2v_mask(lat_t, lat_h, lat_w, carried)
                video = torch.zeros(3, request.clip_len, height, width, dtype=torch.float64)
                if previous is not None:
                    video[:, :carried] = previous
            y = torch.cat([y_ref, torch.cat([mask.to(self.device), encode(video)])], dim=1)
        face = signed_unit(source.face[window["face"]])[None].to(self.device, dtype)
        return _Segment(y[None].to(dtype), clip_features.to(dtype), pose_latents[None].to(dtype), face)

    def _sample_segment(self, request: AnimateRequest, source: AnimateSource, window: dict[str, list[int]],
                        previous: Tensor | None, embeddings: TextEmbeddings, generator: torch.Generator,
                        on_step: Callable[[StepInfo], None] | None) -> Tensor:
        """Sample one segment and decode it without the reference frame: `[3, clip_len, H, W]`."""
        segment = self._segment_inputs(request, source, window, previous)
        _, _, frames, lat_h, lat_w = segment.y.shape
        latents = torch.randn((1, self.task.vae.z_dim, frames, lat_h, lat_w), generator=generator).to(self.device)
        scheduler = make_scheduler(request.solver, request.steps, request.shift,
                                   self.task.sample.num_train_timesteps, device=self.device)
        steps = [(t, Expert.ONLY) for t in scheduler.timesteps.tolist()]
        guided = request.guide_scale > 1
        self._load_expert(Expert.ONLY)
        if self._streamer is not None:
            for _ in range(len(steps) * (2 if guided else 1)):
                self._streamer.expect_forward(Expert.ONLY)
        cond = embeddings.cond[None].to(self.device)
        uncond = embeddings.uncond[None].to(self.device)
        uncond_face = torch.full_like(segment.face, UNCOND_FACE_VALUE)

        def predict(t: float, expert: Expert, latents: Tensor) -> tuple[Tensor, float]:
            self.dit(expert)
            runner = self._runners[expert]
            timestep = torch.tensor([t], device=self.device)

            def forward(context: Tensor, face: Tensor) -> Tensor:
                self.dit_forwards += 1
                return runner(latents, timestep, context, segment.y, segment.clip_features,
                              segment.pose_latents, face)
            velocity = forward(cond, segment.face)
            if guided:
                velocity_uncond = forward(uncond, uncond_face)
                velocity = velocity_uncond + request.guide_scale * (velocity - velocity_uncond)
            return velocity, request.guide_scale
        autocast = torch.autocast(self.device.type, dtype=self.dit_dtype, enabled=self.dit_dtype != torch.float32)
        with torch.no_grad(), autocast:
            latents = run_steps(steps, 0, scheduler, latents, predict, on_step=on_step)
        # The reference latent frame is not part of the video.
        return self.decode(latents[0, :, 1:].float())

