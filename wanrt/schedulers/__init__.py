"""Flow-matching samplers matching the official Wan2.2 ones step for step.

`make_scheduler(solver, steps, shift)` returns a fresh `FlowScheduler` for one run:
`timesteps` (int64 [steps]) to feed the model, `sigmas` (float32 [steps+1], ending in 0; the
noise level of `timesteps[i]` is `sigmas[i]`), and `step(model_output, timestep, sample)`.
"""

from __future__ import annotations

from enum import Enum

import torch

from wanrt.errors import parse_choice
from wanrt.schedulers.base import FlowScheduler
from wanrt.schedulers.dpmpp import DPMPPScheduler
from wanrt.schedulers.euler import EulerScheduler
from wanrt.schedulers.unipc import UniPCScheduler

__all__ = ["DPMPPScheduler", "EulerScheduler", "FlowScheduler", "Solver", "UniPCScheduler",
           "make_scheduler"]


class Solver(str, Enum):
    """Sampler names; 'unipc' and 'dpm++' are the official CLI's `--sample_solver` values."""

    UNIPC = "unipc"
    DPMPP = "dpm++"
    EULER = "euler"


_SCHEDULERS: dict[Solver, type[FlowScheduler]] = {
    Solver.UNIPC: UniPCScheduler,
    Solver.DPMPP: DPMPPScheduler,
    Solver.EULER: EulerScheduler,
}


def make_scheduler(solver: Solver | str, steps: int, shift: float, num_train_timesteps: int = 1000,
                   device: torch.device | str | None = None) -> FlowScheduler:
    """A scheduler configured as the official pipelines do; `timesteps` live on `device`."""
    return _SCHEDULERS[parse_choice(Solver, solver, "solver")](steps, shift, num_train_timesteps, device)
