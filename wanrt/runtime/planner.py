"""The memory planner: (task, size, frames, precision, VRAM and RAM budgets) -> a plan.

Everything is decided before a byte is loaded: which DiT blocks stay resident and which
stream through the prefetch slots, the predicted peak VRAM while sampling and while
decoding, the host RAM the weights need (pinned or not), and the bytes copied per step.
A plan that cannot fit is refused with the remedy.

Weight bytes are counted exactly from the model built on the meta device. Activation and
VAE-decode peaks use per-token / per-pixel coefficients fitted to measurements on an H100
(benchmarks/results/dit_block_h100.json and components_h100.json); they are predictions,
stated as such in the plan.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import Enum

import torch

from wanrt.configs import SIZES, DiTConfig, ModelType, S2VConfig, TaskSpec, VAEVersion, parse_size
from wanrt.errors import InputError
from wanrt.models.animate_dit import AnimateDiT
from wanrt.models.dit import WanDiT
from wanrt.models.s2v_dit import WanS2VDiT

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
# Page-locked memory cannot be swapped or reclaimed; pinning much more than this share of
# RAM starves the OS and the page cache, so the rest of the streamed blocks stay pageable.
MAX_PINNED_FRACTION = 0.6


class Precision(str, Enum):
    BF16 = "bf16"   # not quantized: the weights keep the compute dtype (float32 on CPUs)
    FP8 = "fp8"
    INT8 = "int8"


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
        return [
            f"{self.task} {self.size} {self.frames} frames, {self.precision}: {self.tokens:,} tokens",
            f"weights: {self.experts} x {gib(self.expert_bytes)} ({self.num_blocks} blocks of {gib(self.block_bytes)})",
            f"DiT: {mode}",
            f"device buffers: {self.prefetch_depth + 1 if self.streaming else 0} slots of {gib(self.slot_bytes)}",
            f"predicted peak VRAM: sampling {gib(self.peak_vram_sampling)}, VAE decode "
            f"{gib(self.peak_vram_decode)} (budget {gib(self.vram_budget)})",
            f"host RAM for weights: {gib(self.host_weight_bytes)}, pinned {gib(self.pinned_bytes)} "
            f"(budget {gib(self.ram_budget)})",
            f"copied host->device per step (2 forwards, CFG): {gib(self.bytes_per_step)}",
            f"T5: {'GPU during encoding, freed before sampling' if self.t5_on_gpu else 'CPU'}",
            *self.notes,
            "fits" if self.fits else "DOES NOT FIT",
        ]


T5_BYTES_BF16 = 11_360_000_000  # umt5-xxl encoder, 5.68B parameters in bf16
VAE_WEIGHT_BYTES = 1 * GIB


def make_plan(task: TaskSpec, size: str, frames: int, precision: Precision | str,
              vram_gib: float, ram_gib: float, image: bool = False,
              t5_cpu: bool | None = None) -> MemoryPlan:
    """Plan a run; raises InputError naming the remedy when it cannot fit."""
    precision = Precision(precision)
    vram, ram = int(vram_gib * GIB), int(ram_gib * GIB)
    weights = dit_bytes(task.dit, precision, task.s2v)
    # Quantized runs keep the first and the last block in bf16 (the default precision
    # policy of wanrt.export.quantize): the first is resident, the last may stream, so the
    # slots are bf16-block sized.
    bf16_block = dit_bytes(task.dit, Precision.BF16, task.s2v).block
    extra_high = 0 if precision is Precision.BF16 else bf16_block - weights.block
    grid = token_grid(task, size, frames)
    tokens = math.prod(grid)
    per_token_time = task.dit.model_type is ModelType.TI2V and image
    activations = activation_bytes(task.dit, tokens, per_token_time)
    experts = 2 if task.is_moe else 1
    notes: list[str] = []

    # One expert at a time is on the device: its small modules, resident blocks and slots.
    fixed = VRAM_RESERVE + int(ALLOCATOR_SLACK_FRACTION * vram) + weights.other + activations + extra_high
    room_for_blocks = vram - fixed
    slots = (PREFETCH_DEPTH + 1) * bf16_block if extra_high else (PREFETCH_DEPTH + 1) * weights.block
    if room_for_blocks >= weights.block * weights.num_blocks + extra_high:
        resident, slot_bytes = weights.num_blocks, 0
    else:
        resident = max(0, min(weights.num_blocks - 1, (room_for_blocks - slots) // weights.block))
        slot_bytes = slots // (PREFETCH_DEPTH + 1)
    streamed = weights.num_blocks - resident
    peak_sampling = fixed + resident * weights.block + (slots if streamed else 0)

    width, height = SIZES.get(size) or parse_size(size)
    peak_decode = VRAM_RESERVE + VAE_WEIGHT_BYTES + VAE_DECODE_BYTES_PER_PIXEL[task.vae.version] * height * width

    # T5 on the GPU only when it fits beside nothing else (it is freed before sampling).
    t5_on_gpu = (not t5_cpu) if t5_cpu is not None else (T5_BYTES_BF16 + VRAM_RESERVE + GIB < vram)
    host_weights = experts * (weights.total + 2 * extra_high) + VAE_WEIGHT_BYTES + (0 if t5_on_gpu else T5_BYTES_BF16)
    per_forward = streamed * weights.block + (extra_high if streamed else 0)
    streamed_bytes = experts * per_forward
    pinned = min(streamed_bytes, int(MAX_PINNED_FRACTION * ram))
    if streamed and pinned < streamed_bytes:
        notes.append(f"partial pinning: {pinned / GIB:.1f} of {streamed_bytes / GIB:.1f} GiB of streamed "
                     "blocks pinned; the rest is copied from pageable memory (slower)")
    bytes_per_step = 2 * per_forward
    if streamed:
        notes.append("streamed bytes per step are hidden behind compute when PCIe delivers "
                     f"{bytes_per_step / GIB:.1f} GiB within one step's compute")

    smaller = "a smaller --size or fewer --frame-num"
    lower_precision = ["--precision fp8"] if precision is Precision.BF16 else []
    problems = []  # (what does not fit, remedies)
    if peak_sampling > vram:
        problems.append((f"sampling needs {peak_sampling / GIB:.1f} GiB of VRAM even streaming every block",
                         [*lower_precision, smaller]))
    if peak_decode > vram:
        problems.append((f"the VAE decode needs {peak_decode / GIB:.1f} GiB of VRAM", [smaller]))
    if host_weights + HOST_RESERVE > ram:
        problems.append((f"the weights need {(host_weights + HOST_RESERVE) / GIB:.1f} GiB of host RAM",
                         [*lower_precision, "more --ram"] + ([] if t5_on_gpu else ["T5 on the GPU"])))
    for problem, remedies in problems:
        notes.append(f"{problem}; try {' or '.join(remedies)}")
    fits = not problems
    return MemoryPlan(
        task=task.name, size=size, frames=frames, precision=precision.value, tokens=tokens,
        vram_budget=vram, ram_budget=ram, experts=experts, expert_bytes=weights.total + 2 * extra_high,
        block_bytes=weights.block, num_blocks=weights.num_blocks, resident_blocks=resident,
        streamed_blocks=streamed, prefetch_depth=PREFETCH_DEPTH, slot_bytes=slot_bytes,
        activation_bytes=activations, peak_vram_sampling=peak_sampling, peak_vram_decode=peak_decode,
        host_weight_bytes=host_weights, pinned_bytes=pinned, bytes_per_step=bytes_per_step,
        t5_on_gpu=t5_on_gpu, fits=fits, notes=tuple(notes))


def require_fit(plan: MemoryPlan) -> MemoryPlan:
    if not plan.fits:
        problems = [note for note in plan.notes if "; try " in note]
        raise InputError(f"{plan.task} {plan.size} x{plan.frames} does not fit the budget: {' / '.join(problems)}")
    return plan
