"""The step-distilled sampler of LightX2V (`Wan22StepDistillScheduler`) and Wan2.2-Lightning,
for 4-step distilled checkpoints and LoRAs.

Schedule: the training table sigma_i = linspace(1, 0, N+1)[:-1] (float32), warped by the
shift, indexed at N - s for each s of `denoising_step_list`; timesteps are 1000 * sigma in
float32, never truncated. With [1000, 750, 500, 250] and shift 5 that is t = 1000, 937.5,
833.33, 625. Step: x0 = x - sigma * v, then x0 + sigma_next * v (sigma_next = 0 after the
last step), i.e. deterministic Euler, in LightX2V's order of operations. One conditional
forward per step (guide scale 1); on A14B the first `boundary_step_index` steps run the
high-noise expert (2 of 4), whatever their timestep.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from wanrt.errors import InputError
from wanrt.schedulers.base import FlowScheduler
from wanrt.schedulers.sigmas import shift_sigmas

# The preset of LightX2V's configs/distill/wan22 and Wan2.2-Lightning.
DISTILL_STEPS = 4
DISTILL_SHIFT = 5.0


def default_denoising_steps(steps: int, num_train_timesteps: int = 1000) -> tuple[int, ...]:
    """Evenly spaced training steps from the top: 4 steps give [1000, 750, 500, 250]."""
    return tuple(num_train_timesteps - i * num_train_timesteps // steps for i in range(steps))


class DistillScheduler(FlowScheduler):
    """Euler over a distilled model's fixed `denoising_steps`; the experts split by step index."""

    def __init__(self, steps: int, shift: float, num_train_timesteps: int = 1000,
                 device: torch.device | str | None = None,
                 denoising_steps: Sequence[int] | None = None) -> None:
        if steps < 1:
            raise InputError(f"the number of sampling steps must be at least 1, got {steps}")
        if shift <= 0:
            raise InputError(f"the sampling shift must be positive, got {shift}")
        denoising_steps = tuple(denoising_steps or default_denoising_steps(steps, num_train_timesteps))
        if len(denoising_steps) != steps:
            raise InputError(f"--denoising-step-list has {len(denoising_steps)} entries but --steps is {steps}; "
                             "give one training step per sampling step")
        if (any(not 0 < s <= num_train_timesteps for s in denoising_steps)
                or any(a <= b for a, b in zip(denoising_steps, denoising_steps[1:]))):
            raise InputError(f"--denoising-step-list {list(denoising_steps)} must decrease strictly within "
                             f"1..{num_train_timesteps} (e.g. 1000,750,500,250)")
        self.denoising_steps = denoising_steps
        table = shift_sigmas(torch.linspace(1.0, 0.0, num_train_timesteps + 1)[:-1], shift)
        sigmas = table[[num_train_timesteps - s for s in denoising_steps]]
        self.timesteps = (sigmas * num_train_timesteps).to(device)
        self.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        self.boundary_step_index = steps // 2
        self.reset()

    def _advance(self, model_output: Tensor, sample: Tensor, index: int) -> Tensor:
        x0 = sample - self.sigmas[index] * model_output
        return x0 + self.sigmas[index + 1] * model_output
