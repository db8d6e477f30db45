"""Text/image-to-video sampling with the official Wan2.2 semantics (t2v, i2v, ti2v).

The step loop is `wanrt.pipelines.core.run_steps`; what differs is how the first latents and the DiT's extra
inputs are prepared (`_Conditioning`). Official rules reproduced here:
- the high-noise expert runs iff `t >= boundary * num_train_timesteps`, with the guide
  scale of that expert (`guide_scale` is ordered (low-noise, high-noise));
- CFG is `uncond + scale * (cond - uncond)`, cond and uncond as two forwards;
- i2v-A14B conditions on `y = [mask(4) | VAE(image + zero frames)(16)]`;
- ti2v-5B with an image replaces the first latent frame by the encoded image before the
  loop and after every step, with per-token timesteps that are 0 on that frame.
Noise is drawn from a CPU generator so a seed gives the same video on any device.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from wanrt.configs import SIZES, ModelType, SampleDefaults, TaskSpec, get_task, parse_size
from wanrt.errors import CheckpointError, ConfigError, InputError, parse_choice
from wanrt.export.manifest import device_arch
from wanrt.export.quantize import resolve_precision
from wanrt.loading.checkpoint import (CheckpointFiles, Expert, check_checkpoint, check_checkpoint_task,
                                      check_dit_matches_vae, dit_tensor_infos, load_dit, load_t5, load_vae,
                                      locate_checkpoint)
from wanrt.loading.component_files import ComponentFiles, apply_component_files, stored_precision
from wanrt.lora import LoadedLora, LoraSpec, check_loras, merge_loras, parameter_shapes
from wanrt.models.dit import WanDiT
from wanrt.pipelines.core import (Guidance, MemoryBudget, NonFiniteLatentsError, StepInfo, StreamingConfig,
                                  TextEmbeddings, noise_for, run_steps)
from wanrt.progress import track
from wanrt.request_checks import (check_frame_num, check_guide_scale, check_gib, check_shift,
                                  check_text)
from wanrt.runtime.planner import MemoryPlan, Precision, PrecisionChoice, RamMode, make_plan, require_fit
from wanrt.runtime.step_cache import EasyCache, StepCacheConfig
from wanrt.runtime.streaming import BlockStreamer
from wanrt.runtime.vae_tiling import TiledVAE, VAETiling
from wanrt.schedulers import FlowScheduler, Solver, make_scheduler
from wanrt.schedulers.distill import DISTILL_SHIFT, DISTILL_STEPS


def resolve_size(task: TaskSpec, size: str | None) -> str:
    """`--size`, default the task's first; t2v also renders other sizes (`free_t2v_size`);
    one line naming the supported ones otherwise."""
    size = size or task.sample.sizes[0]
    return size if size in task.sample.sizes else free_t2v_size(task, size)


def resolve_steps(defaults: SampleDefaults, steps: int | None) -> int:
    """`--steps`, default the sampler's (the task's, or the distilled sampler's)."""
    steps = defaults.steps if steps is None else steps
    if steps < 1:
        raise InputError(f"--steps {steps} must be at least 1")
    return steps


@dataclass(frozen=True)
class GenerationRequest:
    """What the user asked for; unset values take the task's official defaults."""

    prompt: str
    size: str | None = None
    frame_num: int | None = None
    steps: int | None = None
    shift: float | None = None
    # (low-noise, high-noise) as in the official code; one value applies to both.
    guide_scale: tuple[float, float] | float | None = None
    solver: str = Solver.UNIPC.value
    seed: int = 0
    negative_prompt: str | None = None
    image: Tensor | None = field(default=None, repr=False)  # [3, H, W] in [-1, 1]
    # The distilled sampler's training steps (default for 4 steps: 1000,750,500,250).
    denoising_steps: tuple[int, ...] | None = None

    def resolved(self, task: TaskSpec) -> "ResolvedRequest":
        """Fill defaults and validate; raises InputError with one line naming the flag.

        The distilled sampler has its own defaults (LightX2V's wan22 distill configs): the
        steps of its denoising list (4), shift 5 and guide scale 1 (no CFG)."""
        solver = parse_choice(Solver, self.solver, "--solver")
        defaults = task.sample
        if solver is Solver.DISTILL:
            defaults = dataclasses.replace(defaults, steps=len(self.denoising_steps or ()) or DISTILL_STEPS,
                                           shift=DISTILL_SHIFT, guide_scale=(1.0, 1.0))
        elif self.denoising_steps is not None:
            raise InputError(f"--denoising-step-list applies to --sampler distill, not {solver.value}")
        size = resolve_size(task, self.size)
        frame_num = defaults.frame_num if self.frame_num is None else self.frame_num
        if frame_num < 1 or (frame_num - 1) % task.vae_stride[0]:
            raise InputError(f"--frame-num {frame_num} must be 4n+1 (e.g. 81, 121)")
        check_frame_num(frame_num)
        steps = resolve_steps(defaults, self.steps)
        guide = defaults.guide_scale if self.guide_scale is None else self.guide_scale
        if isinstance(guide, (int, float)):
            guide = (float(guide), float(guide))
        needs_image = task.dit.model_type is ModelType.I2V
        if needs_image and self.image is None:
            raise InputError(f"{task.name} needs --image")
        if self.image is not None and task.dit.model_type is ModelType.T2V:
            raise InputError(f"{task.name} takes no --image; use an i2v or ti2v task")
        return ResolvedRequest(
            prompt=check_text(self.prompt, "--prompt"), size=size, frame_num=frame_num, steps=steps,
            shift=check_shift(defaults.shift if self.shift is None else self.shift),
            guide_scale=check_guide_scale(tuple(guide)), solver=solver, seed=self.seed,
            negative_prompt=check_text(self.negative_prompt or defaults.negative_prompt, "--negative-prompt"),
            image=self.image, denoising_steps=self.denoising_steps)


def free_t2v_size(task: TaskSpec, size: str) -> str:
    """t2v renders any WIDTH*HEIGHT whose latent grid splits into whole DiT patches (the
    official sizes are the defaults); i2v/ti2v derive their grid from the official areas."""
    official = f"choose one of {', '.join(task.sample.sizes)}"
    if task.dit.model_type is not ModelType.T2V:
        raise InputError(f"--size {size} is not supported by {task.name}; {official}")
    multiple = task.vae_stride[1] * task.dit.patch_size[1]
    try:
        width, height = parse_size(size)
    except ConfigError:
        raise InputError(f"--size {size!r} must be WIDTH*HEIGHT, e.g. {task.sample.sizes[0]}") from None
    if width <= 0 or height <= 0 or width % multiple or height % multiple:
        raise InputError(f"--size {size}: width and height must be positive multiples of {multiple} "
                         f"for {task.name}, or {official}")
    return f"{width}*{height}"


@dataclass(frozen=True)
class ResolvedRequest:
    prompt: str
    size: str
    frame_num: int
    steps: int
    shift: float
    guide_scale: tuple[float, float]
    solver: Solver
    seed: int
    negative_prompt: str
    image: Tensor | None = field(default=None, repr=False)
    denoising_steps: tuple[int, ...] | None = None

    def resolved(self, task: TaskSpec) -> "ResolvedRequest":
        """Already resolved: kept as is, so a caller that chose values beyond the official
        ones (the low preview sizes of `wanrt.preview`) can run it through `generate_video`."""
        return self

    def settings(self) -> dict:
        """JSON-serialisable record of the run options."""
        return {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "size": self.size,
                "frame_num": self.frame_num, "steps": self.steps, "shift": self.shift,
                "guide_scale": list(self.guide_scale), "solver": self.solver.value,
                "seed": self.seed, "has_image": self.image is not None,
                **({"denoising_steps": list(self.denoising_steps)} if self.denoising_steps else {})}


def i2v_latent_hw(image_hw: tuple[int, int], max_area: int, task: TaskSpec) -> tuple[int, int]:
    """i2v-A14B: the latent size that keeps the image's aspect ratio within max_area."""
    aspect = image_hw[0] / image_hw[1]
    patch_h, patch_w = task.dit.patch_size[1:]
    _, stride_h, stride_w = task.vae_stride
    lat_h = round(np.sqrt(max_area * aspect) // stride_h // patch_h * patch_h)
    lat_w = round(np.sqrt(max_area / aspect) // stride_w // patch_w * patch_w)
    return lat_h, lat_w


def best_output_size(width: int, height: int, step_w: int, step_h: int, area: int) -> tuple[int, int]:
    """ti2v-5B with an image: the (w, h) multiple of (step_w, step_h) within `area` whose
    aspect ratio is closest to the image's, rounding the width first or the height first."""
    ratio = width / height
    float_w = (area * ratio) ** 0.5
    float_h = area / float_w
    w_first = int(float_w // step_w * step_w)
    h_first = int(area / w_first // step_h * step_h)
    h_second = int(float_h // step_h * step_h)
    w_second = int(area / h_second // step_w * step_w)

    def distortion(w: int, h: int) -> float:
        return max(ratio / (w / h), (w / h) / ratio)
    if distortion(w_first, h_first) < distortion(w_second, h_second):
        return w_first, h_first
    return w_second, h_second


def _to_pil(image: Tensor):
    """[-1,1] tensor -> the PIL image it came from (the float mapping inverts exactly)."""
    from PIL import Image

    pixels = ((image.clamp(-1, 1) * 0.5 + 0.5) * 255).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def _from_pil(img) -> Tensor:
    array = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy())
    return array.permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)


def latent_grid(task: TaskSpec, request: ResolvedRequest) -> tuple[int, int, int]:
    """(frames, h, w) of the latents `request` samples. The requested size sets the area;
    an image-conditioned run takes the image's aspect ratio within it (i2v-A14B always,
    ti2v-5B when given an image), so its video is not the requested size."""
    width, height = SIZES.get(request.size) or parse_size(request.size)
    stride_t, stride_h, stride_w = task.vae_stride
    frames = (request.frame_num - 1) // stride_t + 1
    model_type = task.dit.model_type
    if model_type is ModelType.I2V:
        return (frames, *i2v_latent_hw(tuple(request.image.shape[1:]), width * height, task))
    if model_type is ModelType.TI2V and request.image is not None:
        step_h, step_w = (task.vae_stride[i] * task.dit.patch_size[i] for i in (1, 2))
        out_w, out_h = best_output_size(request.image.shape[2], request.image.shape[1], step_w, step_h,
                                        width * height)
        return frames, out_h // stride_h, out_w // stride_w
    return frames, height // stride_h, width // stride_w


def output_size(task: TaskSpec, request: ResolvedRequest) -> str:
    """'WIDTH*HEIGHT' of the video `request` generates (see `latent_grid`)."""
    _, lat_h, lat_w = latent_grid(task, request)
    return f"{lat_w * task.vae_stride[2]}*{lat_h * task.vae_stride[1]}"


@dataclass
class _Conditioning:
    """Per-task inputs of the loop: first latents, DiT extras, and the per-step fix-up."""

    latents: Tensor                                  # [1, C, F, h, w]
    y: Tensor | None = None                          # i2v-A14B conditioning
    token_mask: Tensor | None = None                 # ti2v: [1, F*h*w/4], 0 = frozen token
    frozen: Tensor | None = None                     # ti2v: latents of the given image
    frozen_mask: Tensor | None = None                # ti2v: [1, C, F, h, w], 0 = frozen

    def timestep(self, t: Tensor) -> Tensor:
        if self.token_mask is None:
            return t.reshape(1)
        return self.token_mask * t

    def fix_up(self, latents: Tensor) -> Tensor:
        if self.frozen is None:
            return latents
        return (1.0 - self.frozen_mask) * self.frozen + self.frozen_mask * latents


@dataclass(frozen=True)
class SamplingState:
    """A run between steps: what `Pipeline.denoise` continues from (steps `step..` remain)."""

    request: ResolvedRequest
    latents: Tensor                 # [1, C, F, h, w] on the pipeline's device
    scheduler: FlowScheduler        # carries the multistep history across calls
    step: int                       # index of the next step in `scheduler.timesteps`
    conditioning: _Conditioning


class Pipeline:
    """Loads components lazily from one checkpoint and runs the official sampling loop.

    A run given text embeddings that only wants latents never loads T5 or the VAE (for
    t2v), and a folder holding just the DiT experts is then enough.
    """

    def __init__(self, task: TaskSpec, files: CheckpointFiles | None, device: torch.device,
                 dit_dtype: torch.dtype, text_device: torch.device | None = None,
                 text_dtype: torch.dtype | None = None, memory: MemoryBudget | None = None,
                 streaming: StreamingConfig | None = None, precision: str = "bf16",
                 quantized_dir: Path | None = None, loras: Sequence[LoraSpec] = (),
                 step_cache: StepCacheConfig | None = None) -> None:
        self.task = task
        self.files = files
        self.device = device
        self.dit_dtype = dit_dtype
        self.text_device = text_device or device
        self.text_dtype = text_dtype or dit_dtype
        # A budget makes the first `sample` plan the run (and stream blocks if needed);
        # an explicit `streaming` config skips the planner (tests, benchmarks).
        self.memory = memory
        self.streaming = streaming
        # DiT weight precision: "bf16" keeps the loaded weights; "fp8"/"int8" quantize the
        # block Linears at load time with the default policy (wanrt.export.quantize); "auto"
        # is the one of those the device's architecture runs best. `requested_precision` is
        # what was asked, `precision` the concrete one this run uses.
        self.requested_precision = parse_choice(PrecisionChoice, precision, "--precision")
        arch = device_arch(device)
        self.precision = stored_precision(files, precision, arch).value  # 8-bit DiT files run as stored
        # What decided auto: the architecture, unless the DiT files' own 8-bit format overrode it.
        self.precision_source = (arch if self.precision == resolve_precision(precision, arch).value
                                 else "as the DiT files store it")
        self.quant_summaries: dict[str, str] = {}
        # Experts saved by `wanrt quantize` replace the checkpoint's DiT folders.
        self.quantized_files = None
        if quantized_dir is not None:
            if not Path(quantized_dir).is_dir():
                raise CheckpointError(f"{quantized_dir}: --quantized folder not found; write it with "
                                      "`wanrt quantize --out`")
            self.quantized_files = locate_checkpoint(Path(quantized_dir), task)
            if self.requested_precision not in (PrecisionChoice.BF16, PrecisionChoice.AUTO):
                raise InputError("--precision quantizes at load time; it cannot be combined with --quantized")
            from wanrt.export.quant_io import quantized_scheme

            self.precision = Precision(quantized_scheme(next(iter(self.quantized_files.dit_dirs.values())))).value
            self.precision_source = "as the --quantized folder stores it"
        if loras and self.quantized_files is not None:
            raise InputError("--lora merges into the bf16 weights before quantizing; use --precision fp8/int8 "
                             "with the checkpoint instead of --quantized")
        # Opened and checked against the task's DiT shapes now, before any weight loads.
        experts = (Expert.HIGH_NOISE, Expert.LOW_NOISE) if task.is_moe else (Expert.ONLY,)
        self.loras: list[LoadedLora] = check_loras(loras, self._dit_shapes(task), experts) if loras else []
        self.step_cache = step_cache
        # What the last run did: DiT forwards run, and the steps the step cache reused.
        self.dit_forwards = 0
        self.cached_steps: list[int] = []
        self.plan: MemoryPlan | None = None
        self._streamer: BlockStreamer | None = None
        self._experts: dict[Expert, WanDiT] = {}
        # What the loop calls for each expert: the model itself, or what `wrap_expert`
        # makes of it once loaded (a compiled engine, a sequence-parallel wrapper).
        self._runners: dict[Expert, Callable[..., Tensor]] = {}
        self.wrap_expert: Callable[[Expert, WanDiT], Callable[..., Tensor]] | None = None
        # Experts whose weights `wrap_expert` has placed itself (FSDP shards on each rank's
        # device): `dit` and `offload_dit` never move them.
        self.wrapper_placed: set[Expert] = set()
        # Applied once to the VAE before its first use (an engine routing its causal steps).
        self.prepare_vae: Callable[[torch.nn.Module], None] | None = None
        self._vae_prepared = False
        self.guidance = Guidance()
        self._streamed_experts: set[Expert] = set()
        self._active_expert: Expert | None = None
        self._text_encoder = None
        self._vae = None
        self.load_seconds: dict[str, float] = {}
        # Host RAM: ONE_EXPERT frees T5 once the prompt is encoded and the high-noise expert
        # at the MoE boundary, before the low-noise one is read (set by the plan, or by hand).
        self.ram_mode = RamMode.BOTH
        # Spatial VAE tiles (set by the plan from the VRAM budget); None decodes whole frames.
        self.vae_tiling: VAETiling | None = None
        # The TAEHV file (`use_tiny_vae`) that decodes instead of the VAE, and the model.
        self.tiny_vae_path: Path | None = None
        self._tiny_vae = None

    @staticmethod
    def _dit_shapes(task: TaskSpec) -> dict[str, tuple[int, ...]]:
        with torch.device("meta"):
            return parameter_shapes(WanDiT(task.dit))

    @classmethod
    def from_pretrained(cls, ckpt_dir: str | Path, task: str, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, t5_cpu: bool = False,
                        vram_gib: float | None = None, ram_gib: float | None = None,
                        precision: str = "bf16", quantized_dir: str | Path | None = None,
                        loras: Sequence[LoraSpec] = (), step_cache: StepCacheConfig | None = None,
                        components: ComponentFiles | None = None) -> "Pipeline":
        """On a GPU the run is planned within `vram_gib`/`ram_gib` (default: what the
        machine has), streaming DiT blocks when the experts do not fit. `loras` are merged
        into the experts they name as each loads; `step_cache` skips near-repeated steps."""
        spec = get_task(task)
        vram_gib, ram_gib = check_gib(vram_gib, "--vram"), check_gib(ram_gib, "--ram")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # bf16 on GPUs as the official code; float32 on the CPU, where bf16 is slow and the
        # tests compare against float32 references.
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        text_device = torch.device("cpu") if t5_cpu else device
        memory = MemoryBudget.detect(device, vram_gib, ram_gib) if device.type == "cuda" else None
        if components is None or not (components.dit or components.dit_high or components.dit_low):
            check_checkpoint_task(Path(ckpt_dir), spec)
        return cls(spec, apply_component_files(locate_checkpoint(Path(ckpt_dir), spec), spec, components),
                   device, dtype, text_device, memory=memory, precision=precision,
                   quantized_dir=quantized_dir, loras=loras, step_cache=step_cache)

    @classmethod
    def from_models(cls, task: TaskSpec, experts: dict[Expert, WanDiT], vae=None,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    memory: MemoryBudget | None = None, text_encoder=None,
                    loras: Sequence[LoraSpec] = ()) -> "Pipeline":
        """A pipeline over models already built (benchmarks with random full-size weights,
        converted models); a run then needs text embeddings (or `text_encoder`, a
        `wanrt.text_encoder.TextEncoder`), and the VAE only to decode. `loras` are merged
        into `experts` here, in place."""
        pipeline = cls(task, None, torch.device(device), dtype, memory=memory, loras=loras)
        for expert, model in experts.items():
            pipeline._merge_loras(expert, model)
        pipeline._experts.update(experts)
        pipeline._vae = vae
        pipeline._text_encoder = text_encoder
        return pipeline

    # ------------------------------------------------------------------ components

    def _timed_load(self, name: str, load: Callable):
        start = time.perf_counter()
        value = load()
        self.load_seconds[name] = time.perf_counter() - start
        return value

    def _merge_loras(self, expert: Expert, model: WanDiT) -> None:
        merge_loras(model, [lora for lora in self.loras if lora.spec.applies_to(expert)])

    def lora_records(self) -> list[dict]:
        return [lora.record() for lora in self.loras]

    def check_files(self) -> None:
        """Check every component file this pipeline will load, reading headers only."""
        check_checkpoint(self._require_files(), self.task, check_dits=self.quantized_files is None)

    def _require_files(self) -> CheckpointFiles:
        if self.files is None:
            raise InputError("this pipeline has no checkpoint folder; pass ckpt_dir")
        return self.files

    def _load_expert(self, expert: Expert) -> WanDiT:
        """Load to host memory; with streaming, hand the blocks to the streamer (once)."""
        if expert not in self._experts and self.quantized_files is not None:
            from wanrt.export.quant_io import load_quantized

            folder = self.quantized_files.dit_dirs[expert]
            model = self._timed_load(f"dit_{expert.value}", lambda: load_quantized(folder, expect_config=self.task.dit))
            self.quant_summaries[expert.value] = model.quant_report.summary()
            self._experts[expert] = model
        file_tensors = None
        if expert not in self._experts:
            folder = self._require_files().dit_dirs[expert]
            leave_in_file = self._blocks_left_in_file()
            model = self._timed_load(f"dit_{expert.value}", lambda: self.read_dit(folder, leave_in_file))
            if leave_in_file is not None:
                file_tensors = dit_tensor_infos(folder, expect=self.task.dit)
            check_dit_matches_vae(model.config, self.task.vae, str(folder))
            # LoRAs first: quantization, pinning and streaming then see the merged weights.
            self._merge_loras(expert, model)
            if self.precision != Precision.BF16.value and not hasattr(model, "quant_report"):
                from wanrt.export.quantize import quantize

                quantize(model, self.precision)
            if hasattr(model, "quant_report"):  # quantized here, or stored 8-bit in a single file
                self.quant_summaries[expert.value] = model.quant_report.summary()
            self._experts[expert] = model
        if self.streaming is not None and expert not in self._streamed_experts:
            if self._streamer is None:
                self._streamer = BlockStreamer(self.device, depth=self.streaming.depth,
                                               pin_limit_bytes=self.streaming.pin_limit_bytes)
            self._streamer.register(expert, self._experts[expert],
                                    resident_blocks=self.streaming.resident_blocks, file_tensors=file_tensors)
            self._streamed_experts.add(expert)
        if expert not in self._runners:
            model = self._experts[expert]
            self._runners[expert] = model if self.wrap_expert is None else self.wrap_expert(expert, model)
        return self._experts[expert]

    def read_dit(self, folder: Path, leave_in_file: Callable[[str], bool] | None = None) -> WanDiT:
        """One DiT folder in host memory, in the DiT dtype, less the parameters `leave_in_file`
        names (a task family's own DiT class overrides this)."""
        return load_dit(folder, expect=self.task.dit, dtype=self.dit_dtype, leave_in_file=leave_in_file)

    def _blocks_left_in_file(self) -> Callable[[str], bool] | None:
        """RAM mode stream-file: the streamed blocks' parameter names, which are read from the
        checkpoint on every turn instead of being loaded."""
        if self.ram_mode is not RamMode.STREAM_FILE:
            return None
        if self.streaming is None or self.precision != Precision.BF16.value or self.quantized_files is not None:
            raise InputError("--ram-mode stream-file streams bf16 blocks from the checkpoint: it needs block "
                             "streaming (a memory plan) and no --precision/--quantized")
        resident = self.streaming.resident_blocks
        return lambda key: key.startswith("blocks.") and int(key.split(".")[1]) >= resident

    def _place(self, expert: Expert, device: torch.device | str) -> None:
        """Move what of `expert` is not streamed (all of it without streaming)."""
        if expert in self.wrapper_placed:
            return
        if self._streamer is not None:
            self._streamer.move_resident(expert, device)
        else:
            self._experts[expert].to(device)

    def dit(self, expert: Expert) -> WanDiT:
        """The expert, ready to run: only one expert's resident weights are on the device
        at a time (the MoE swap happens here, once per run at the boundary)."""
        model = self._load_expert(expert)
        if self._active_expert is not expert:
            if self._active_expert is not None:
                self._place(self._active_expert, "cpu")
            self._place(expert, self.device)
            self._active_expert = expert
        return model

    @property
    def streamed_bytes(self) -> int:
        """Host-to-device bytes the block streamer has copied so far (0 without streaming)."""
        return self._streamer.bytes_copied if self._streamer is not None else 0

    def offload_dit(self) -> None:
        """Give the device memory of the DiT back (before the VAE decode)."""
        if self._active_expert is not None:
            self._place(self._active_expert, "cpu")
            self._active_expert = None
        if self._streamer is not None:
            self._streamer.release()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def text_encoder(self):
        if self._text_encoder is None:
            from wanrt.models.tokenizer import PromptTokenizer
            from wanrt.text_encoder import TextEncoder

            files = self._require_files()
            tokenizer = PromptTokenizer.from_folder(files.tokenizer, text_len=self.task.t5.text_len,
                                                    vocab_size=self.task.t5.vocab_size)
            encoder = self._timed_load("t5", lambda: load_t5(files.t5, self.task.t5, dtype=self.text_dtype))
            # Kept in host memory; `encode_text` brings it to `text_device` only to encode.
            self._text_encoder = TextEncoder(tokenizer, encoder)
        return self._text_encoder

    @property
    def vae(self):
        if self._vae is None:
            files = self._require_files()
            # The official pipelines run the VAE in float32.
            self._vae = self._timed_load("vae", lambda: load_vae(files.vae, self.task.vae, dtype=torch.float32))
        if self.prepare_vae is not None and not self._vae_prepared:
            self.prepare_vae(self._vae)
            self._vae_prepared = True
        return self._vae.to(self.device)  # a no-op once it is there

    # ------------------------------------------------------------------ stages

    def encode_text(self, prompt: str, negative_prompt: str) -> TextEmbeddings:
        """Both prompts in one batch. A GPU-resident T5 goes back to the host right after,
        so it never holds device memory during sampling."""
        encoder = self.text_encoder
        encoder.encoder.to(self.text_device)
        cond, uncond = encoder([prompt, negative_prompt])
        if self.text_device.type == "cuda":
            encoder.encoder.to("cpu")
            torch.cuda.empty_cache()
        if self.ram_mode is not RamMode.BOTH:
            self._text_encoder = None
        return TextEmbeddings(cond.float().cpu(), uncond.float().cpu())

    def latent_grid(self, request: ResolvedRequest) -> tuple[int, int, int]:
        return latent_grid(self.task, request)

    def _condition(self, request: ResolvedRequest, noise: Tensor | None) -> _Conditioning:
        frames, lat_h, lat_w = self.latent_grid(request)
        model_type = self.task.dit.model_type
        shape = (1, self.task.vae.z_dim, frames, lat_h, lat_w)
        latents = noise_for(shape[1:], request.seed)[None] if noise is None else noise.reshape(shape).float()
        latents = latents.to(self.device)
        if model_type is ModelType.I2V:
            return _Conditioning(latents, y=self._i2v_condition(request.image, request.frame_num, lat_h, lat_w))
        if model_type is ModelType.TI2V and request.image is not None:
            return self._ti2v_condition(request.image, latents)
        return _Conditioning(latents)

    def _i2v_condition(self, image: Tensor, frame_num: int, lat_h: int, lat_w: int) -> Tensor:
        _, stride_h, stride_w = self.task.vae_stride
        height, width = lat_h * stride_h, lat_w * stride_w
        resized = F.interpolate(image[None].float().cpu(), size=(height, width), mode="bicubic")
        video = torch.cat([resized.transpose(0, 1), torch.zeros(3, frame_num - 1, height, width)], dim=1)
        with torch.no_grad():
            encoded = self.codec().encode(video[None].to(self.device))[0]
        # Mask: 1 on pixel frame 0, repeated 4x so the frames fold into [4, F_lat] channels.
        mask = torch.zeros(1, frame_num, lat_h, lat_w, device=self.device)
        mask[:, 0] = 1
        mask = torch.cat([mask[:, :1].repeat_interleave(4, dim=1), mask[:, 1:]], dim=1)
        mask = mask.view(mask.shape[1] // 4, 4, lat_h, lat_w).transpose(0, 1)
        return torch.cat([mask, encoded])[None]

    def _ti2v_condition(self, image: Tensor, latents: Tensor) -> _Conditioning:
        from PIL import Image

        _, _, _, lat_h, lat_w = latents.shape
        out_h, out_w = lat_h * self.task.vae_stride[1], lat_w * self.task.vae_stride[2]
        img = _to_pil(image)
        scale = max(out_w / img.width, out_h / img.height)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)
        left, top = (img.width - out_w) // 2, (img.height - out_h) // 2
        img = img.crop((left, top, left + out_w, top + out_h))
        with torch.no_grad():
            frozen = self.codec().encode(_from_pil(img)[None, :, None].to(self.device))
        frozen_mask = torch.ones_like(latents)
        frozen_mask[:, :, 0] = 0
        patch_h, patch_w = self.task.dit.patch_size[1:]
        token_mask = frozen_mask[:, 0, :, ::patch_h, ::patch_w].flatten(1)
        conditioning = _Conditioning(latents, token_mask=token_mask, frozen=frozen, frozen_mask=frozen_mask)
        conditioning.latents = conditioning.fix_up(latents)
        return conditioning

    def expert_for(self, t: int) -> Expert:
        if not self.task.is_moe:
            return Expert.ONLY
        boundary = self.task.sample.boundary * self.task.sample.num_train_timesteps
        return Expert.HIGH_NOISE if t >= boundary else Expert.LOW_NOISE

    def start(self, request: GenerationRequest | ResolvedRequest,
              noise: Tensor | None = None) -> SamplingState:
        """Plan the run (once), prepare the first latents and conditioning, and a fresh
        scheduler: the state before step 0."""
        if isinstance(request, GenerationRequest):
            request = request.resolved(self.task)
        if self.plan is None:
            self.plan_run(request)
        conditioning = self._condition(request, noise)
        self.dit_forwards = 0
        self.cached_steps = []
        return SamplingState(request, conditioning.latents, self.new_scheduler(request), 0, conditioning)

    def new_scheduler(self, request: ResolvedRequest) -> FlowScheduler:
        """A fresh scheduler for `request`'s schedule, its timesteps on this pipeline's device."""
        return make_scheduler(request.solver, request.steps, request.shift,
                              self.task.sample.num_train_timesteps, device=self.device,
                              denoising_steps=request.denoising_steps)

    def schedule(self, state: SamplingState, stop: int | None = None) -> list[tuple[float, Expert]]:
        """(timestep, expert) of the steps `state.step .. stop` (default: to the end). The
        expert follows the timestep boundary, or the step index for a sampler that fixes
        the split (the distilled one: LightX2V's `boundary_step_index`)."""
        timesteps = state.scheduler.timesteps.tolist()
        boundary_step = state.scheduler.boundary_step_index if self.task.is_moe else None

        def expert_at(index: int) -> Expert:
            if boundary_step is None:
                return self.expert_for(timesteps[index])
            return Expert.HIGH_NOISE if index < boundary_step else Expert.LOW_NOISE
        return [(timesteps[i], expert_at(i)) for i in range(len(timesteps))[state.step:stop]]

    def denoise(self, state: SamplingState, embeddings: TextEmbeddings, stop: int | None = None,
                on_step: Callable[[StepInfo], None] | None = None,
                on_state: Callable[[SamplingState], None] | None = None) -> SamplingState:
        """Run steps `state.step .. stop` (default: to the end) and return the state after them.

        Starting mid-schedule (refining a video, handing a run to another device) continues
        the scheduler it is given; its step counter is set from `state.step`. `on_state`
        sees the state after each step (to checkpoint it: wanrt.resume)."""
        steps = self.schedule(state, stop)
        def scale_of(expert: Expert) -> float:
            return state.request.guide_scale[0 if expert is Expert.LOW_NOISE else 1]
        phases = list(dict.fromkeys(expert for _, expert in steps))
        if self.ram_mode is not RamMode.BOTH and phases:
            self._enter_phase(phases[0], steps, scale_of)
        else:
            for expert in phases:
                self._load_expert(expert)
            self._announce(steps, scale_of)
        cond = embeddings.cond[None].to(self.device)
        uncond = embeddings.uncond[None].to(self.device)
        conditioning = state.conditioning

        def predict(t: float, expert: Expert, latents: Tensor) -> tuple[Tensor, float]:
            if self.ram_mode is not RamMode.BOTH and expert not in self._experts:
                self._enter_phase(expert, [step for step in steps if step[1] is expert], scale_of)
            self.dit(expert)
            runner, scale = self._runners[expert], scale_of(expert)
            timestep = conditioning.timestep(torch.tensor(t, device=self.device))

            def forward(*args, **kwargs) -> Tensor:
                self.dit_forwards += 1
                return runner(*args, **kwargs)
            return self.guidance(forward, latents, timestep, cond, uncond, conditioning.y, scale), scale
        cache = None
        if self.step_cache is not None:
            cache = EasyCache(self.step_cache, len(state.scheduler.timesteps))
            predict = cache.wrap(predict, state.step)

        autocast = torch.autocast(self.device.type, dtype=self.dit_dtype,
                                  enabled=self.dit_dtype != torch.float32)
        with torch.no_grad(), autocast:
            latents = run_steps(steps, state.step, state.scheduler, state.latents, predict,
                                conditioning.fix_up, on_step,
                                on_latents=None if on_state is None else lambda step, latents: on_state(
                                    dataclasses.replace(state, latents=latents, step=step)))
        if cache is not None:
            self.cached_steps += cache.skipped
        return dataclasses.replace(state, latents=latents, step=state.step + len(steps))

    def _announce(self, steps: list[tuple[float, Expert]], scale_of: Callable[[Expert], float]) -> None:
        """Tell the block streamer the order of the coming forwards, so prefetching crosses
        forwards and the MoE boundary (experts not registered yet are skipped). Steps the
        step cache skips leave their blocks announced; the streamer realigns."""
        if self._streamer is not None:
            for _, expert in steps:
                for _ in range(self.guidance.forwards_for(scale_of(expert))):
                    self._streamer.expect_forward(expert)

    def _enter_phase(self, expert: Expert, steps: list[tuple[float, Expert]],
                     scale_of: Callable[[Expert], float]) -> None:
        """One expert in host RAM at a time: free every other expert (device and host,
        pinned buffers included) before `expert` is read from the checkpoint."""
        for other in [e for e in self._experts if e is not expert]:
            self.free_expert(other)
        self._load_expert(expert)
        self._announce(steps, scale_of)

    def free_expert(self, expert: Expert) -> None:
        """Drop every reference this pipeline holds to `expert`'s weights."""
        if self._active_expert is expert:
            self._active_expert = None  # its device tensors go with the model
        if self._streamer is not None and expert in self._streamed_experts:
            self._streamer.unregister(expert)
            self._streamed_experts.discard(expert)
        self._experts.pop(expert, None)
        self._runners.pop(expert, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def sample(self, request: GenerationRequest | ResolvedRequest, embeddings: TextEmbeddings | None = None,
               noise: Tensor | None = None, on_step: Callable[[StepInfo], None] | None = None) -> Tensor:
        """Run the whole denoising loop; returns the final latents `[C, F, h, w]` (float32, CPU)."""
        if isinstance(request, GenerationRequest):
            request = request.resolved(self.task)
        if embeddings is None:
            embeddings = self.encode_text(request.prompt, request.negative_prompt)
        state = self.denoise(self.start(request, noise), embeddings, on_step=on_step)
        return state.latents[0].float().cpu()

    def decode(self, latents: Tensor) -> Tensor:
        """Latents `[C, F, h, w]` -> video `[3, T, H, W]` in [-1, 1] (float32, CPU).

        The DiT leaves the device first, and frames move to the host one causal step at a
        time, so the device holds one step's activations, never the whole video.
        """
        if not torch.isfinite(latents).all():
            raise NonFiniteLatentsError("the latents contain NaN/Inf; refusing to decode")
        self.offload_dit()
        decoder = (self._tiny_vae.to(self.device) if self._tiny_vae is not None
                   else self.codec(output_device="cpu"))
        with torch.no_grad():
            steps = track(decoder.iter_decode(latents[None].to(self.device).float()), "VAE decode",
                          total=latents.shape[1])
            chunks = [frames.float().cpu() for frames in steps]
        return torch.cat(chunks, dim=2)[0]

    def codec(self, output_device: torch.device | str | None = None):
        """The VAE as the plan runs it: tiled (results gathered on `output_device`, default
        this pipeline's device) or whole frames."""
        if self.vae_tiling is None:
            return self.vae
        return TiledVAE(self.vae, self.vae_tiling, output_device or self.device)

    def use_tiny_vae(self, path: Path | None = None) -> None:
        """Decode with the tiny VAE in `path` (default: the published file name inside the
        checkpoint folder), loaded now so a wrong file fails before sampling."""
        from wanrt.loading.tiny_vae import find_tiny_vae, load_tiny_vae

        self.tiny_vae_path = Path(path) if path is not None else find_tiny_vae(self._require_files().root,
                                                                              self.task.vae)
        self._tiny_vae = self._timed_load("tiny_vae", lambda: load_tiny_vae(
            self.tiny_vae_path, self.task.vae, dtype=torch.float32))

    def decode_record(self) -> dict:
        """What decoded the video, for the sidecar."""
        if self.tiny_vae_path is not None:
            return {"vae": "tiny", "file": str(self.tiny_vae_path)}
        tiling = dataclasses.asdict(self.vae_tiling) if self.vae_tiling is not None else None
        return {"vae": "full", "tiling": tiling}

    def plan_run(self, request: GenerationRequest | ResolvedRequest) -> MemoryPlan | None:
        """Plan the run within the memory budget before anything loads, refusing one that
        cannot fit, and set up streaming if the plan streams. None when there is no budget
        (CPU runs) or the DiT runs in float32 (the planner counts bf16/fp8/int8 weights)."""
        if isinstance(request, GenerationRequest):
            request = request.resolved(self.task)
        if self.memory is None or self.dit_dtype != torch.bfloat16:
            return None
        return self.adopt_plan(require_fit(make_plan(
            self.task, request.size, request.frame_num, self.precision, self.memory.vram_gib,
            self.memory.ram_gib, image=request.image is not None,
            t5_cpu=self.text_device.type == "cpu", quantize_at_load=self.quantized_files is None,
            steps=request.steps)))

    def adopt_plan(self, plan: MemoryPlan) -> MemoryPlan:
        """Run by `plan`: its RAM mode and VAE tiling, and stream the DiT blocks it streams
        (unless streaming was set explicitly)."""
        self.plan = plan
        self.ram_mode = RamMode(plan.ram_mode)
        self.vae_tiling = plan.vae_tiling
        if plan.streaming and self.streaming is None:
            self.streaming = StreamingConfig(plan.resident_blocks, plan.prefetch_depth, plan.pinned_bytes)
        return plan
