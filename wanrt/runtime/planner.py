"""The memory planner: (task, size, frames, precision, VRAM and RAM budgets) -> a plan.

Everything is decided before a byte is loaded: which DiT blocks stay resident and which
stream through the prefetch slots, the predicted peak VRAM while sampling and while
decoding, the host RAM the weights need (pinned or not), and the bytes copied per step.
A plan that cannot fit is refused with a remedy that was checked to fit (the planner
searches precision, T5 placement, fewer frames and a smaller size), or with "nothing fits".

Besides the DiT, the plan picks:
- the VAE tiling (`wanrt.runtime.vae_tiling`): the fewest spatial tiles whose decode peak
  fits the VRAM budget, or none when the whole frame fits;
- the host-RAM mode (`RamMode`): both experts held for the whole run, or one expert at a
  time (the high-noise expert is freed at the MoE boundary before the low-noise one is read,
  and T5 is freed once the prompt is encoded);
- a predicted time on an H100 from measured throughputs (DiT bf16 TFLOP/s, PCIe host to
  device, VAE decode seconds per pixel), with the disk read rate as a stated assumption.

Weight bytes are counted exactly from the model built on the meta device. Activation and
VAE-decode peaks use per-token / per-pixel coefficients fitted to measurements on an H100
(benchmarks/results/dit_block_h100.json and components_h100.json); they are predictions,
stated as such in the plan.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import asdict, dataclass
from enum import Enum

import torch

from wanrt.configs import SIZES, DiTConfig, ModelType, S2VConfig, TaskSpec, VAEConfig, VAEVersion, parse_size
from wanrt.errors import InputError
from wanrt.models.animate_dit import AnimateDiT
from wanrt.models.dit import WanDiT
from wanrt.models.s2v_dit import WanS2VDiT
from wanrt.request_checks import check_gib
from wanrt.runtime.vae_tiling import VAETiling

# DiT variants whose parameters differ from `WanDiT`'s (Animate: CLIP rows, face branch).
DIT_CLASSES: dict[ModelType, type[WanDiT]] = {ModelType.ANIMATE: AnimateDiT}

GIB = 2**30

# Peak activation bytes of one DiT block forward per token, fitted on A14B (dim 5120,
# ffn 13824: 123,965 B/token at 480P and 720P alike) and 5B (3072, 14336: 88,108 B/token):
# ~18 bytes per model channel (float32 residual, modulated input, rotated q/k) plus ~2.3
# per FFN channel (the bf16 hidden state).
ACTIVATION_BYTES_PER_DIM = 18.1
ACTIVATION_BYTES_PER_FFN = 2.27
# Peak VAE decode bytes per output pixel position (one causal step decodes 4 frames at
# full resolution; frames leave the device after each step), float32. Wan2.1: 18.4 GB
# peak at 480x832 inside the pipeline (e2e_stream_h100.json), more than the 11.95 GB of a
# standalone decode (components_h100.json, cause not yet found). Wan2.2: 22.5 GB at
# 704x1280 standalone; not yet measured inside the pipeline.
VAE_DECODE_BYTES_PER_PIXEL = {VAEVersion.WAN2_1: 42_000, VAEVersion.WAN2_2: 25_000}
# CUDA context and cuBLAS workspaces, which no tensor accounts for.
VRAM_RESERVE = 1 * GIB
# Allocator fragmentation: on the H100 a plan packed to the last MiB failed with 1.7 GiB
# reserved-but-unallocated under a 24 GiB cap (benchmarks/e2e_stream_bench.py), so keep
# this share of the budget free even with expandable segments.
ALLOCATOR_SLACK_FRACTION = 0.06
# Python, torch, the tokenizer and page cache the process needs besides the weights.
HOST_RESERVE = 4 * GIB
PREFETCH_DEPTH = 2
# float32 VAE weights (components_h100.json `weight_bytes`).
VAE_WEIGHT_BYTES = {VAEVersion.WAN2_1: 507_570_124, VAEVersion.WAN2_2: 2_818_754_672}
# VAE tiles overlap by 64 output pixels, as diffusers' tiled Wan decode blends (256-pixel
# tiles every 192); fewer tiles are tried first.
VAE_TILE_OVERLAP_PIXELS = 64
MAX_VAE_TILES_PER_SIDE = 8
# Measured on the H100 (benchmarks/results): whole bf16 A14B forwards ran at 425 (480P) and
# 470 (720P) TFLOP/s of counted FLOPs (stream_h100.json `resident`, 3.95 s and 13.88 s), pinned host->device copies at 47.2 GB/s (stream_h100.json), and a
# float32 VAE decode of 2.91 s for 81x480x832 px (Wan2.1) / 9.50 s for 121x704x1280 px
# (Wan2.2) (components_h100.json): seconds per output pixel-frame.
H100_DIT_FLOPS = 450e12
H100_PINNED_COPY_BYTES_PER_S = 47.2e9
H100_VAE_DECODE_SECONDS_PER_PIXEL = {VAEVersion.WAN2_1: 2.914 / (81 * 480 * 832),
                                     VAEVersion.WAN2_2: 9.496 / (121 * 704 * 1280)}
# Not measured here: how fast the checkpoint's disk reads (a loaded expert at the MoE boundary).
ASSUMED_DISK_BYTES_PER_S = 2e9
# Page-locked memory cannot be swapped or reclaimed; pinning much more than this share of
# RAM starves the OS and the page cache, so the rest of the streamed blocks stay pageable.
MAX_PINNED_FRACTION = 0.6


class Precision(str, Enum):
    BF16 = "bf16"   # not quantized: the weights keep the compute dtype (float32 on CPUs)
    FP8 = "fp8"
    INT8 = "int8"


class PrecisionChoice(str, Enum):
    """What `--precision` takes: a `Precision`, or auto, which `resolve_precision`
    (wanrt.export.quantize) turns into the one the run's GPU architecture runs best."""

    BF16 = "bf16"
    FP8 = "fp8"
    INT8 = "int8"
    AUTO = "auto"


_SHORT_DTYPE_NAMES = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}


def short_dtype_name(dtype: str | torch.dtype) -> str:
    """'bf16', 'fp32', 'fp16' as the CLI spells them (other dtypes by torch's name)."""
    name = str(dtype).removeprefix("torch.")
    return _SHORT_DTYPE_NAMES.get(name, name)


# Bytes per Linear weight element, and whether a float32 scale per output channel is added.
_LINEAR_WEIGHT_BYTES = {Precision.BF16: 2, Precision.FP8: 1, Precision.INT8: 1}


@dataclass(frozen=True)
class ModelBytes:
    """Weight bytes of one DiT (expert): its repeated block and everything else."""

    block: int
    num_blocks: int
    other: int

    @property
    def total(self) -> int:
        return self.block * self.num_blocks + self.other


@functools.lru_cache(maxsize=None)  # the remedy search re-plans a run many times
def dit_bytes(config: DiTConfig, precision: Precision, s2v: S2VConfig | None = None) -> ModelBytes:
    """Exact weight bytes from the model built on `meta`: Linear weights in the blocks at
    `precision` (plus per-channel float32 scales when quantized); biases, norms and the
    modulation tables float32/bf16 as loaded; everything outside the blocks bf16, except
    the float32 time MLPs and head."""
    with torch.device("meta"):
        # S2V adds its audio encoder and injectors (~1.9B parameters on 14B) outside the blocks.
        model = (WanS2VDiT(config, s2v) if s2v is not None
                 else DIT_CLASSES.get(config.model_type, WanDiT)(config))

    def size(name: str, param: torch.Tensor, in_block: bool) -> int:
        parts = name.split(".")
        if any(part in model.keep_in_fp32 for part in parts):
            return param.numel() * 4
        if in_block and param.dim() == 2:
            scale = param.shape[0] * 4 if precision is not Precision.BF16 else 0
            return param.numel() * _LINEAR_WEIGHT_BYTES[precision] + scale
        return param.numel() * 2

    block = sum(size(n, p, True) for n, p in model.blocks[0].named_parameters())
    other = sum(size(n, p, False) for n, p in model.named_parameters() if not n.startswith("blocks."))
    return ModelBytes(block, config.num_layers, other)


def token_grid(task: TaskSpec, size: str, frames: int) -> tuple[int, int, int]:
    width, height = SIZES.get(size) or parse_size(size)
    stride_t, stride_h, stride_w = task.vae_stride
    _, patch_h, patch_w = task.dit.patch_size
    return (frames - 1) // stride_t + 1, height // stride_h // patch_h, width // stride_w // patch_w


def activation_bytes(config: DiTConfig, tokens: int, per_token_time: bool) -> int:
    """Peak bytes of a forward beyond the weights: the block peak plus what lives across
    blocks (float32 tokens; per-token time modulation for ti2v with an image)."""
    block_peak = tokens * (ACTIVATION_BYTES_PER_DIM * config.dim + ACTIVATION_BYTES_PER_FFN * config.ffn_dim)
    resident = tokens * config.dim * 4
    if per_token_time:
        resident += tokens * config.dim * 4 * 7  # time_emb [L, dim] + time_mod [L, 6, dim]
    return int(block_peak + resident)


class RamMode(str, Enum):
    """What of the DiT the host holds. A14B runs its experts in two contiguous phases."""

    BOTH = "both"               # both experts (and T5) held for the whole run
    ONE_EXPERT = "one-expert"   # T5 freed after encoding; the high-noise expert freed at the
    #                             boundary, then the low-noise one read from the checkpoint
    STREAM_FILE = "stream-file"  # as one-expert, but streamed blocks are read from the
    #                              checkpoint file for every forward, never held


@dataclass(frozen=True)
class MemoryPlan:
    task: str
    size: str
    frames: int
    precision: str
    tokens: int
    vram_budget: int
    ram_budget: int
    experts: int
    expert_bytes: int
    block_bytes: int
    num_blocks: int
    resident_blocks: int
    streamed_blocks: int
    prefetch_depth: int
    slot_bytes: int
    activation_bytes: int
    peak_vram_sampling: int
    peak_vram_decode: int
    host_weight_bytes: int
    pinned_bytes: int
    bytes_per_step: int
    t5_on_gpu: bool
    fits: bool
    notes: tuple[str, ...]
    ram_mode: str = RamMode.BOTH.value
    vae_tiling: VAETiling | None = None
    vae_tiles: int = 1
    peak_host_ram: int = 0
    steps: int = 0
    predicted_seconds: dict[str, float] | None = None
    vae_pixels_per_latent: int = 8
    remedy: str | None = None

    @property
    def streaming(self) -> bool:
        return self.streamed_blocks > 0

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        """Human-readable summary (what `wanrt plan` prints)."""
        gib = lambda n: f"{n / GIB:.2f} GiB"  # noqa: E731
        mode = (f"stream {self.streamed_blocks}/{self.num_blocks} blocks per expert, "
                f"{self.resident_blocks} resident, prefetch depth {self.prefetch_depth}"
                if self.streaming else "all blocks resident")
        stride = self.vae_pixels_per_latent
        tiling = (f"{self.vae_tiles} tiles of {self.vae_tiling.describe(stride)}" if self.vae_tiling
                  else "whole frame")
        times = self.predicted_seconds or {}
        return [
            f"{self.task} {self.size} {self.frames} frames, {self.precision}: {self.tokens:,} tokens",
            f"weights: {self.experts} x {gib(self.expert_bytes)} ({self.num_blocks} blocks of {gib(self.block_bytes)})",
            f"DiT: {mode}",
            f"device buffers: {self.prefetch_depth + 1 if self.streaming else 0} slots of {gib(self.slot_bytes)}",
            f"VAE: {tiling}",
            f"predicted peak VRAM: sampling {gib(self.peak_vram_sampling)}, VAE decode "
            f"{gib(self.peak_vram_decode)} (budget {gib(self.vram_budget)})",
            f"host RAM: {self.ram_mode}, peak {gib(self.peak_host_ram)} (weights {gib(self.host_weight_bytes)}, "
            f"pinned {gib(self.pinned_bytes)}; budget {gib(self.ram_budget)})",
            f"copied host->device per step (2 forwards, CFG): {gib(self.bytes_per_step)}",
            f"T5: {'GPU during encoding, freed before sampling' if self.t5_on_gpu else 'CPU'}",
            f"predicted time on an H100 ({self.steps} steps): sampling {times.get('sampling', 0):.0f} s, "
            f"expert loads {times.get('loading', 0):.0f} s, VAE decode {times.get('decode', 0):.0f} s",
            *self.notes,
            "fits" if self.fits else "DOES NOT FIT",
        ]


T5_BYTES_BF16 = 11_360_000_000  # umt5-xxl encoder, 5.68B parameters in bf16


def vae_decode_peak(vae: VAEConfig, tile_pixels: int) -> int:
    """Device bytes of a decode whose tile (or whole frame) has `tile_pixels` output pixels:
    one tile's causal cache and step activations exist at a time."""
    return VRAM_RESERVE + VAE_WEIGHT_BYTES[vae.version] + VAE_DECODE_BYTES_PER_PIXEL[vae.version] * tile_pixels


def choose_vae_tiling(vae: VAEConfig, latent_hw: tuple[int, int], vram: int) -> tuple[VAETiling | None, int]:
    """The fewest equal overlapping tiles whose decode fits `vram` (None: the whole frame
    fits), and the predicted peak. Falls back to the most tiles tried when none fits."""
    stride = vae.stride[1]
    usable = vram - int(ALLOCATOR_SLACK_FRACTION * vram)
    height, width = latent_hw
    whole = vae_decode_peak(vae, height * width * stride * stride)
    if whole <= usable:
        return None, whole
    overlap = VAE_TILE_OVERLAP_PIXELS // stride
    best: tuple[VAETiling | None, int] = (None, whole)
    layouts = sorted(((rows, cols) for rows in range(1, MAX_VAE_TILES_PER_SIDE + 1)
                      for cols in range(1, MAX_VAE_TILES_PER_SIDE + 1) if rows * cols > 1),
                     key=lambda rc: (rc[0] * rc[1], abs(rc[0] - rc[1])))
    for rows, cols in layouts:
        tile_h = min(height, -(-(height + (rows - 1) * overlap) // rows))
        tile_w = min(width, -(-(width + (cols - 1) * overlap) // cols))
        if min(tile_h, tile_w) <= overlap:
            continue
        tiling = VAETiling(tile_h, tile_w, overlap)
        peak = vae_decode_peak(vae, tile_h * tile_w * stride * stride)
        best = (tiling, peak)
        if peak <= usable:
            break
    return best


def predicted_seconds(task: TaskSpec, tokens: int, steps: int, per_forward_copy: int,
                      loaded_at_boundary: int, frames: int, pixels: int, tiled_pixels: int,
                      per_token_time: bool, copy_bytes_per_s: float = H100_PINNED_COPY_BYTES_PER_S
                      ) -> dict[str, float]:
    """H100 seconds from the measured coefficients: a streamed forward takes the longer of
    its compute and its copies (from pinned RAM, or from disk in stream-file mode); the
    decode scales with the pixels the tiles cover."""
    from wanrt.bench.flops import dit_forward_flops

    compute = dit_forward_flops(task.dit, tokens, per_token_time).total / H100_DIT_FLOPS
    forward = max(compute, per_forward_copy / copy_bytes_per_s)
    decode = H100_VAE_DECODE_SECONDS_PER_PIXEL[task.vae.version] * frames * tiled_pixels
    return {"sampling": round(2 * steps * forward, 1),
            "loading": round(loaded_at_boundary / ASSUMED_DISK_BYTES_PER_S, 1),
            "decode": round(decode, 1)}


def make_plan(task: TaskSpec, size: str, frames: int, precision: Precision | str,
              vram_gib: float, ram_gib: float, image: bool = False,
              t5_cpu: bool | None = None, ram_mode: RamMode | str | None = None,
              quantize_at_load: bool = False, steps: int | None = None,
              search_remedy: bool = True) -> MemoryPlan:
    """Plan a run. `ram_mode` None picks the first of BOTH, ONE_EXPERT, STREAM_FILE that fits.
    `quantize_at_load`: fp8/int8 experts are quantized from the bf16 checkpoint while loading
    (one bf16 expert passes through host RAM), rather than read from a `wanrt quantize` folder.
    A plan that does not fit carries, in `remedy`, the first change found that fits."""
    precision = Precision(precision)
    vram = int(check_gib(vram_gib, "--vram") * GIB)
    ram = int(check_gib(ram_gib, "--ram") * GIB)
    steps = task.sample.steps if steps is None else steps
    weights = dit_bytes(task.dit, precision, task.s2v)
    # Quantized runs keep the first and the last block in bf16 (the default precision
    # policy of wanrt.export.quantize): the first is resident, the last may stream, so the
    # slots are bf16-block sized.
    bf16 = dit_bytes(task.dit, Precision.BF16, task.s2v)
    extra_high = 0 if precision is Precision.BF16 else bf16.block - weights.block
    grid = token_grid(task, size, frames)
    tokens = math.prod(grid)
    per_token_time = task.dit.model_type is ModelType.TI2V and image
    activations = activation_bytes(task.dit, tokens, per_token_time)
    experts = 2 if task.is_moe else 1
    notes: list[str] = []

    # One expert at a time is on the device: its small modules, resident blocks and slots.
    fixed = VRAM_RESERVE + int(ALLOCATOR_SLACK_FRACTION * vram) + weights.other + activations + extra_high
    room_for_blocks = vram - fixed
    slots = (PREFETCH_DEPTH + 1) * bf16.block if extra_high else (PREFETCH_DEPTH + 1) * weights.block
    if room_for_blocks >= weights.block * weights.num_blocks + extra_high:
        resident, slot_bytes = weights.num_blocks, 0
    else:
        resident = max(0, min(weights.num_blocks - 1, (room_for_blocks - slots) // weights.block))
        slot_bytes = slots // (PREFETCH_DEPTH + 1)
    streamed = weights.num_blocks - resident
    peak_sampling = fixed + resident * weights.block + (slots if streamed else 0)

    width, height = SIZES.get(size) or parse_size(size)
    _, stride_h, stride_w = task.vae_stride
    tiling, peak_decode = choose_vae_tiling(task.vae, (height // stride_h, width // stride_w), vram)
    tiles = tiling.count(height // stride_h, width // stride_w) if tiling else 1
    tiled_pixels = tiles * tiling.tile_height * tiling.tile_width * stride_h * stride_w if tiling else height * width
    if tiling:
        notes.append(f"VAE decode/encode in {tiles} tiles ({tiling.describe(stride_h)}); the whole frame "
                     f"would need {vae_decode_peak(task.vae, height * width) / GIB:.1f} GiB")

    # T5 on the GPU only when it fits beside nothing else (it is freed before sampling).
    t5_vram = T5_BYTES_BF16 + VRAM_RESERVE + GIB
    t5_on_gpu = (not t5_cpu) if t5_cpu is not None else t5_vram < vram
    expert_bytes = weights.total + 2 * extra_high
    vae_bytes = VAE_WEIGHT_BYTES[task.vae.version]
    # Quantizing at load time holds the bf16 expert until its blocks are quantized.
    loading_expert = bf16.total if quantize_at_load and precision is not Precision.BF16 else expert_bytes

    per_forward = streamed * weights.block + (extra_high if streamed else 0)
    # Reading blocks from the file needs them stored as they run (bf16) and streamed at all.
    file_streaming_possible = streamed > 0 and precision is Precision.BF16

    def host_peak(mode: RamMode) -> tuple[int, int]:
        """(weights held while sampling, peak host bytes over the run's phases)."""
        if mode is RamMode.BOTH:
            held = experts * expert_bytes + vae_bytes + T5_BYTES_BF16
            loading = (experts - 1) * expert_bytes + loading_expert + T5_BYTES_BF16
        elif mode is RamMode.ONE_EXPERT:
            held = expert_bytes + vae_bytes
            loading = loading_expert + vae_bytes
        else:  # only the resident part and the pinned staging buffers, one per slot
            held = loading = expert_bytes - per_forward + slots + vae_bytes
        return held, max(held, loading, T5_BYTES_BF16) + HOST_RESERVE
    modes = [RamMode.BOTH, RamMode.ONE_EXPERT] + ([RamMode.STREAM_FILE] if file_streaming_possible else [])
    explicit_ram_mode = ram_mode is not None
    if ram_mode is None:
        ram_mode = next((mode for mode in modes if host_peak(mode)[1] <= ram), modes[-1])
    ram_mode = RamMode(ram_mode)
    if ram_mode not in modes:
        raise InputError(f"--ram-mode {ram_mode.value} reads bf16 blocks from the checkpoint: it needs "
                         "--precision bf16 and a plan that streams blocks")
    host_weights, peak_host = host_peak(ram_mode)
    from_file = ram_mode is RamMode.STREAM_FILE
    # Host copies of streamed blocks to pin (stream-file has none: its staging is pinned).
    streamed_bytes = 0 if from_file else (experts if ram_mode is RamMode.BOTH else 1) * per_forward
    pinned = min(streamed_bytes, int(MAX_PINNED_FRACTION * ram))
    if streamed and pinned < streamed_bytes:
        notes.append(f"partial pinning: {pinned / GIB:.1f} of {streamed_bytes / GIB:.1f} GiB of streamed "
                     "blocks pinned; the rest is copied from pageable memory (slower)")
    bytes_per_step = 2 * per_forward
    if streamed:
        notes.append("streamed bytes per step are hidden behind compute when PCIe delivers "
                     f"{bytes_per_step / GIB:.1f} GiB within one step's compute")
    loaded_at_boundary = (expert_bytes - per_forward if from_file else expert_bytes) if (
        ram_mode is not RamMode.BOTH and task.is_moe) else 0
    if from_file:
        pinned_rate = predicted_seconds(task, tokens, steps, per_forward, 0, frames, 0, 0, per_token_time)
        disk_rate = predicted_seconds(task, tokens, steps, per_forward, 0, frames, 0, 0, per_token_time,
                                      copy_bytes_per_s=ASSUMED_DISK_BYTES_PER_S)
        notes.append(f"stream-file: {per_forward / GIB:.1f} GiB of blocks read from the checkpoint every forward; "
                     f"sampling ~{disk_rate['sampling']:.0f} s instead of ~{pinned_rate['sampling']:.0f} s from RAM "
                     f"({disk_rate['sampling'] / max(pinned_rate['sampling'], 1e-9):.1f}x slower at an assumed "
                     f"{ASSUMED_DISK_BYTES_PER_S / 1e9:.0f} GB/s disk)")
    elif loaded_at_boundary:
        notes.append(f"one expert in host RAM at a time: the low-noise expert ({expert_bytes / GIB:.1f} GiB) is "
                     f"read at the MoE boundary, ~{loaded_at_boundary / ASSUMED_DISK_BYTES_PER_S:.0f} s at an "
                     f"assumed {ASSUMED_DISK_BYTES_PER_S / 1e9:.0f} GB/s disk")
    if quantize_at_load and precision is not Precision.BF16:
        notes.append(f"quantizing at load holds a bf16 expert ({bf16.total / GIB:.1f} GiB) in host RAM while "
                     "it loads; a `wanrt quantize` folder (--quantized) avoids it")
    seconds = predicted_seconds(task, tokens, steps, per_forward, loaded_at_boundary, frames, height * width,
                                tiled_pixels, per_token_time,
                                copy_bytes_per_s=ASSUMED_DISK_BYTES_PER_S if from_file else H100_PINNED_COPY_BYTES_PER_S)

    problems = []
    if peak_sampling > vram:
        problems.append(f"sampling needs {peak_sampling / GIB:.1f} GiB of VRAM even streaming every block")
    if peak_decode > vram:
        problems.append(f"the VAE decode needs {peak_decode / GIB:.1f} GiB of VRAM even in "
                        f"{tiles} tiles")
    if t5_on_gpu and t5_vram > vram:
        problems.append(f"T5 on the GPU needs {t5_vram / GIB:.1f} GiB of VRAM")
    if peak_host > ram:
        problems.append(f"the run needs {peak_host / GIB:.1f} GiB of host RAM ({ram_mode.value})")
    fits = not problems
    plan = MemoryPlan(
        task=task.name, size=size, frames=frames, precision=precision.value, tokens=tokens,
        vram_budget=vram, ram_budget=ram, experts=experts, expert_bytes=expert_bytes,
        block_bytes=weights.block, num_blocks=weights.num_blocks, resident_blocks=resident,
        streamed_blocks=streamed, prefetch_depth=PREFETCH_DEPTH, slot_bytes=slot_bytes,
        activation_bytes=activations, peak_vram_sampling=peak_sampling, peak_vram_decode=peak_decode,
        host_weight_bytes=host_weights, pinned_bytes=pinned, bytes_per_step=bytes_per_step,
        t5_on_gpu=t5_on_gpu, fits=fits, notes=tuple(notes), ram_mode=ram_mode.value,
        vae_tiling=tiling, vae_tiles=tiles, peak_host_ram=peak_host, steps=steps,
        predicted_seconds=seconds, vae_pixels_per_latent=stride_h)
    if fits or not search_remedy:
        return plan
    remedy = find_remedy(task, vram_gib, ram_gib, dict(
        size=size, frames=frames, precision=precision, image=image, t5_cpu=t5_on_gpu is False,
        ram_mode=ram_mode if explicit_ram_mode else None, quantize_at_load=quantize_at_load, steps=steps))
    advice = (f"try {remedy}" if remedy else
              "nothing tried fits this machine (precision, RAM mode, T5 placement, fewer frames, smaller size)")
    return dataclasses.replace(plan, notes=(*plan.notes, f"{' / '.join(problems)}; {advice}"), remedy=remedy)


def _smaller_sizes(task: TaskSpec, size: str) -> list[str]:
    """Sizes to suggest, largest first: the task's official ones below `size`, and for t2v
    (any multiple of the latent patch) the same aspect ratio scaled down."""
    width, height = SIZES.get(size) or parse_size(size)
    official = [s for s in task.sample.sizes if math.prod(SIZES.get(s) or parse_size(s)) < width * height]
    if task.dit.model_type is not ModelType.T2V:
        return official
    multiple = task.vae_stride[1] * task.dit.patch_size[1]
    scaled = []
    for factor in (0.875, 0.75, 0.625, 0.5, 0.375, 0.25):
        w, h = (max(multiple, int(v * factor) // multiple * multiple) for v in (width, height))
        scaled.append(f"{w}*{h}")
    return sorted(dict.fromkeys(official + scaled), key=lambda s: -math.prod(parse_size(s)))


def find_remedy(task: TaskSpec, vram_gib: float, ram_gib: float, run: dict) -> str | None:
    """The first change to `run` (make_plan's keyword arguments), in the order a user loses
    least, whose plan fits; as the CLI flags that make it."""
    candidates: list[tuple[str, dict]] = []
    if run["precision"] is Precision.BF16:
        candidates += [(f"--precision {lower.value}", {"precision": lower}) for lower in (Precision.FP8, Precision.INT8)]
    elif run["quantize_at_load"]:
        candidates.append(("experts from `wanrt quantize` (--quantized)", {"quantize_at_load": False}))
    if run["ram_mode"] is RamMode.BOTH:
        candidates.append((f"--ram-mode {RamMode.ONE_EXPERT.value}", {"ram_mode": RamMode.ONE_EXPERT}))
    if run["ram_mode"] in (RamMode.BOTH, RamMode.ONE_EXPERT) and run["precision"] is Precision.BF16:
        candidates.append((f"--ram-mode {RamMode.STREAM_FILE.value}", {"ram_mode": RamMode.STREAM_FILE}))
    if not run["t5_cpu"]:
        candidates.append(("--t5-cpu", {"t5_cpu": True}))
    frames = run["frames"]
    for fewer in dict.fromkeys((frames * 3 // 4, frames // 2, frames // 4)):
        fewer = fewer // task.vae_stride[0] * task.vae_stride[0] + 1
        if 1 <= fewer < frames:
            candidates.append((f"--frame-num {fewer}", {"frames": fewer}))
    candidates += [(f"--size {smaller}", {"size": smaller}) for smaller in _smaller_sizes(task, run["size"])]
    for flags, change in candidates:
        plan = make_plan(task, vram_gib=vram_gib, ram_gib=ram_gib, search_remedy=False, **{**run, **change})
        if plan.fits:
            return (f"{flags} (peak VRAM {max(plan.peak_vram_sampling, plan.peak_vram_decode) / GIB:.1f} GiB, "
                    f"host RAM {plan.peak_host_ram / GIB:.1f} GiB)")
    return None


def require_fit(plan: MemoryPlan) -> MemoryPlan:
    if not plan.fits:
        problems = [note for note in plan.notes if "; try " in note or "nothing tried fits" in note]
        raise InputError(f"{plan.task} {plan.size} x{plan.frames} does not fit the budget: {' / '.join(problems)}")
    return plan
