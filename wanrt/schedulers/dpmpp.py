"""DPM-Solver++ for flow matching, as the Wan2.2 pipelines run the official
`FlowDPMSolverMultistepScheduler` ('dpm++').

The configuration they use: multistep order 2, midpoint form, x0 prediction, first order on
the first and the last step. The schedule starts at sigma 1 (`get_sampling_sigmas`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from wanrt.schedulers.base import MultistepScheduler, log_snr


class DPMPPScheduler(MultistepScheduler):
    """DPM-Solver++(2M), midpoint variant, in x0 form."""

    starts_from_pure_noise = True

    def _advance(self, model_output: Tensor, sample: Tensor, index: int) -> Tensor:
        x0 = self._predict_x0(model_output, sample, index)
        order = self._remember(x0, index)
        sigma_t, sigma_s0 = self.sigmas[index + 1], self.sigmas[index]
        lambda_s0 = log_snr(sigma_s0)
        h = log_snr(sigma_t) - lambda_s0
        # At sigma_s0 = 1 (the first step), lambda_s0 = -inf and h = +inf: exp(-h) = 0 keeps
        # the step finite, giving sigma_t * sample + alpha_t * x0.
        weight = (1 - sigma_t) * (torch.exp(-h) - 1.0)
        prev_sample = (sigma_t / sigma_s0) * sample - weight * x0
        if order == 1:
            return prev_sample
        # On the second step lambda_s1 = -inf makes 1/r_0 = 0, so that step is first order too.
        r_0 = (lambda_s0 - log_snr(self.sigmas[index - 1])) / h
        slope = (1.0 / r_0) * (x0 - self.x0_history[-2])
        return prev_sample - 0.5 * weight * slope
