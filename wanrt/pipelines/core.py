"""What every task family's sampling shares: the memory budget and streaming settings,
text embeddings, classifier-free guidance, the initial noise, and the step loop itself
(scheduler update, per-step fix-up, NaN guard, progress callback).

A family (`video`: t2v/i2v/ti2v; `s2v`; `animate`) prepares its own latents and DiT
inputs and hands the loop a `predict` function; the loop never knows which task runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from wanrt.errors import WanrtError
from wanrt.loading.checkpoint import Expert
from wanrt.schedulers import FlowScheduler


class NonFiniteLatentsError(WanrtError):
    """Sampling produced NaN/Inf; nothing is decoded or written."""


@dataclass(frozen=True)
class TextEmbeddings:
    cond: Tensor    # [L_cond, text_dim], trimmed to the prompt's tokens
    uncond: Tensor  # [L_uncond, text_dim]


@dataclass(frozen=True)
class MemoryBudget:
    vram_gib: float
    ram_gib: float

    @classmethod
    def detect(cls, device: torch.device, vram_gib: float | None, ram_gib: float | None) -> "MemoryBudget":
        """What the user gave, else what the device and the host have."""
        if vram_gib is None:
            vram_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
        if ram_gib is None:
            ram_gib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
        return cls(vram_gib, ram_gib)


@dataclass(frozen=True)
class StreamingConfig:
    resident_blocks: int
    depth: int = 2
    pin_limit_bytes: int | None = None


@dataclass(frozen=True)
class StepInfo:
    index: int
    total: int
    timestep: float  # an integer for the official samplers; float for the distilled one
    expert: Expert
    guide_scale: float


class Guidance:
    """Classifier-free guidance as the official code computes it: the conditional and the
    unconditional forward in turn, combined as `uncond + scale * (cond - uncond)`.

    A strategy object so that distributed runs can split the two forwards across ranks
    (`forwards_per_step` is what each process runs with CFG, which the block streamer
    schedules). A guide scale of 1 makes the mix the conditional prediction itself, so
    that step runs the conditional forward alone (CFG-free: distilled models)."""

    forwards_per_step = 2

    def forwards_for(self, scale: float) -> int:
        """DiT forwards this process runs for one step at guide scale `scale`."""
        return 1 if scale == 1.0 else self.forwards_per_step

    def __call__(self, forward: Callable[..., Tensor], latents: Tensor, timestep: Tensor, cond: Tensor,
                 uncond: Tensor, y: Tensor | None, scale: float) -> Tensor:
        pred_cond = forward(latents, timestep, cond, y=y)
        if scale == 1.0:
            return pred_cond
        pred_uncond = forward(latents, timestep, uncond, y=y)
        return pred_uncond + scale * (pred_cond - pred_uncond)


def noise_for(shape: tuple[int, ...], seed: int) -> Tensor:
    """Initial noise from a CPU generator: identical on every device for a given seed."""
    return torch.randn(shape, generator=torch.Generator(device="cpu").manual_seed(seed),
                       dtype=torch.float32)



# predict(t, expert, latents) -> (velocity, guide scale used): one step's model output.
Predict = Callable[[float, Expert, Tensor], tuple[Tensor, float]]


def run_steps(steps: Sequence[tuple[float, Expert]], first_index: int, scheduler: FlowScheduler,
              latents: Tensor, predict: Predict, fix_up: Callable[[Tensor], Tensor] | None = None,
              on_step: Callable[[StepInfo], None] | None = None) -> Tensor:
    """The denoising loop over `steps` (timestep, expert), numbered from `first_index`.

    Continues the scheduler it is given (its multistep history), so a run can stop and
    resume mid-schedule. Stops at the first step whose latents hold NaN/Inf.
    """
    total = len(scheduler.timesteps)
    scheduler.step_index = first_index
    for index, (t, expert) in enumerate(steps, start=first_index):
        velocity, scale = predict(t, expert, latents)
        latents = scheduler.step(velocity, t, latents)
        if fix_up is not None:
            latents = fix_up(latents)
        if not torch.isfinite(latents).all():
            raise NonFiniteLatentsError(
                f"sampling diverged at step {index + 1}/{total} (t={t}): NaN/Inf "
                "in the latents; nothing was written. Try float32/bf16 instead of a "
                "quantized precision, or another seed")
        if on_step is not None:
            on_step(StepInfo(index, total, t, expert, scale))
    return latents
