"""The sigma/timestep schedules of the official Wan2.2 samplers.

Both official recipes are the same computation with a different starting sigma: `steps`
values evenly spaced from `sigma_max` down to 0 (the 0 itself dropped), warped by the time
shift, in float64. The timesteps are then `int64(sigma * num_train_timesteps)`, truncated
(999.92 gives 999), and the sigmas are rounded to float32 with a final 0 appended.

* UniPC (`set_timesteps(steps, shift=shift)`) starts from the top of the training table,
  float32(1 - 1/N), so its first timestep is 999.
* DPM++ (`get_sampling_sigmas(steps, shift)`) starts from sigma 1, so its first timestep is
  1000. Its scheduler is built with shift 1, which maps every sigma to itself exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """The time shift s -> shift*s / (1 + (shift-1)*s); shift > 1 spends more steps at high noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def training_sigma_max(num_train_timesteps: int) -> float:
    """The largest sigma of the training table, which the official code stores in float32."""
    return torch.tensor(1.0 - 1.0 / num_train_timesteps, dtype=torch.float32).item()


def flow_schedule(steps: int, shift: float, sigma_max: float,
                  num_train_timesteps: int) -> tuple[Tensor, Tensor]:
    """(timesteps int64 [steps], sigmas float32 [steps+1] ending in 0), as the official code.

    The spacing repeats numpy.linspace(sigma_max, 0, steps+1) operation for operation
    (index * step + start, in float64), so the truncated timesteps match bit for bit.
    """
    spacing = (0.0 - sigma_max) / steps
    sigmas = shift_sigmas(torch.arange(steps, dtype=torch.float64) * spacing + sigma_max, shift)
    timesteps = (sigmas * num_train_timesteps).to(torch.int64)
    return timesteps, torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)
