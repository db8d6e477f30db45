"""Flow-matching samplers matching the official Wan2.2 ones step for step.

`make_scheduler(solver, steps, shift)` returns a fresh `FlowScheduler` for one run:
`timesteps` (int64 [steps]; float32 for the distilled sampler) to feed the model, `sigmas` (float32 [steps+1], ending in 0; the
noise level of `timesteps[i]` is `sigmas[i]`), and `step(model_output, timestep, sample)`.
"""

from __future__ import annotations

from enum import Enum
from typing import Sequence

import torch

from wanrt.errors import InputError, parse_choice
from wanrt.schedulers.base import FlowScheduler
from wanrt.schedulers.distill import DistillScheduler
from wanrt.schedulers.dpmpp import DPMPPScheduler
from wanrt.schedulers.euler import EulerScheduler
from wanrt.schedulers.unipc import UniPCScheduler

__all__ = ["DPMPPScheduler", "DistillScheduler", "EulerScheduler", "FlowScheduler", "Solver", "UniPCScheduler",
           "make_scheduler"]


class Solver(str, Enum):
    """Sampler names; 'unipc' and 'dpm++' are the official CLI's `--sample_solver` values."""

    UNIPC = "unipc"
    DPMPP = "dpm++"
    EULER = "euler"
    # LightX2V / Wan2.2-Lightning 4-step distilled models and LoRAs.
    DISTILL = "distill"


_SCHEDULERS: dict[Solver, type[FlowScheduler]] = {
    Solver.UNIPC: UniPCScheduler,
    Solver.DPMPP: DPMPPScheduler,
    Solver.EULER: EulerScheduler,
    Solver.DISTILL: DistillScheduler,
}


def make_scheduler(solver: Solver | str, steps: int, shift: float, num_train_timesteps: int = 1000,
                   device: torch.device | str | None = None,
                   denoising_steps: Sequence[int] | None = None) -> FlowScheduler:
    """A scheduler configured as the official pipelines do; `timesteps` live on `device`.
    `denoising_steps` is the distilled sampler's training-step list."""
    solver = parse_choice(Solver, solver, "solver")
    if denoising_steps is None:
        return _SCHEDULERS[solver](steps, shift, num_train_timesteps, device)
    if solver is not Solver.DISTILL:
        raise InputError(f"--denoising-step-list applies to --sampler distill, not {solver.value}")
    return DistillScheduler(steps, shift, num_train_timesteps, device, denoising_steps)
