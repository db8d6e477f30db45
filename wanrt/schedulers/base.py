"""What every flow-matching scheduler shares: the schedule, the step index and the x0 history.

Conventions of the flow path: x_sigma = (1 - sigma) * x0 + sigma * noise, and the model
predicts the velocity v = noise - x0. Sampling walks `sigmas` from the first value down to 0.

All coefficients are computed the official way, on 0-d float32 CPU tensors (the sigmas never
leave the CPU), then broadcast over the sample. A 0-d CPU tensor folds into a GPU kernel as a
scalar, so this costs no host synchronisation and rounds exactly like the official code.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from wanrt.errors import InputError
from wanrt.schedulers.sigmas import flow_schedule, training_sigma_max


def log_snr(sigma: Tensor) -> Tensor:
    """lambda = log(alpha / sigma) with alpha = 1 - sigma; -inf at sigma 1 and +inf at sigma 0."""
    return torch.log(1 - sigma) - torch.log(sigma)


class FlowScheduler:
    """A sampler over a fixed schedule: `timesteps` (int64 [steps], on `device`) and `sigmas`
    (float32 [steps+1] on the CPU, ending in 0); `sigmas[i]` is the noise level of
    `timesteps[i]`.

    `step` is called once per timestep, in order. Like the official schedulers, the first call
    finds its position by looking up the timestep (`index_for_timestep`; a run may start
    mid-schedule) and later calls advance the counter `step_index`, whatever timestep they are
    given. Assigning `step_index` before the first call skips the lookup. One instance serves
    one run: call `reset()` before reusing it.
    """

    # The official DPM++ path starts at sigma 1 (pure noise), the others at the top of the
    # training table.
    starts_from_pure_noise: ClassVar[bool] = False
    # A14B experts switch at the timestep boundary; a sampler that fixes the split by step
    # index instead (the distilled one) sets this to the first low-noise step.
    boundary_step_index: int | None = None

    def __init__(self, steps: int, shift: float, num_train_timesteps: int = 1000,
                 device: torch.device | str | None = None) -> None:
        if steps < 1:
            raise InputError(f"the number of sampling steps must be at least 1, got {steps}")
        if shift <= 0:
            raise InputError(f"the sampling shift must be positive, got {shift}")
        sigma_max = 1.0 if self.starts_from_pure_noise else training_sigma_max(num_train_timesteps)
        timesteps, self.sigmas = flow_schedule(steps, shift, sigma_max, num_train_timesteps)
        self.timesteps = timesteps.to(device)
        self.reset()

    def reset(self) -> None:
        """Forget the current run: the next `step` looks its timestep up again."""
        self.step_index: int | None = None

    def index_for_timestep(self, timestep: int | Tensor) -> int:
        """The first position of `timestep` in `timesteps`.

        Truncation repeats timesteps when steps * shift is large (UniPC: 999 twice from 100
        steps at shift 12). The official lookup takes the second occurrence, so a run started
        at the first one overruns the schedule on its last call (an AssertionError in UniPC,
        an IndexError in DPM++). The first occurrence agrees with the official lookup whenever
        the timestep is not repeated, and lets such runs complete.
        """
        matches = (self.timesteps == torch.as_tensor(timestep, device=self.timesteps.device)).nonzero()
        if len(matches) == 0:
            raise InputError(f"timestep {int(timestep)} is not in the schedule {self.timesteps.tolist()}")
        return int(matches[0])

    def step(self, model_output: Tensor, timestep: int | Tensor, sample: Tensor) -> Tensor:
        """Move `sample` from `sigmas[i]` to `sigmas[i+1]` given the velocity `model_output`."""
        if self.step_index is None:
            self.step_index = self.index_for_timestep(timestep)
        if self.step_index >= len(self.timesteps):
            raise InputError(f"step called past the last of the {len(self.timesteps)} timesteps; "
                             "call reset() to start a new run")
        prev_sample = self._advance(model_output, sample, self.step_index)
        self.step_index += 1
        return prev_sample

    def _advance(self, model_output: Tensor, sample: Tensor, index: int) -> Tensor:
        raise NotImplementedError


class MultistepScheduler(FlowScheduler):
    """A second-order multistep solver in data-prediction (x0) form."""

    def reset(self) -> None:
        super().reset()
        self.x0_history: list[Tensor] = []

    def _predict_x0(self, model_output: Tensor, sample: Tensor, index: int) -> Tensor:
        # x = (1 - sigma) x0 + sigma noise and v = noise - x0 give x0 = x - sigma v.
        return sample - self.sigmas[index] * model_output

    def _remember(self, x0: Tensor, index: int) -> int:
        """Keep the last two x0 predictions and return the order of this step: 1 on the first
        step of a run (nothing to extrapolate from) and on the last step (to sigma 0, where h is
        infinite and the higher-order terms are undefined), else 2."""
        self.x0_history = [*self.x0_history[-1:], x0]
        return min(len(self.x0_history), len(self.timesteps) - index)
