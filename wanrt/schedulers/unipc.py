"""UniPC for flow matching, as the Wan2.2 pipelines run the official `FlowUniPCMultistepScheduler`.

The configuration they use: order 2, x0 prediction, B(h) = expm1(-h) ("bh2"),
lower_order_final, every corrector enabled. Each step at sigmas[i]:

1. x0 = sample - sigma_i * v, from the sample as the predictor left it.
2. UniC (from the second step on): redo the previous step, last_sample at sigmas[i-1] ->
   sigmas[i], with this x0 as an extra node; the result replaces the sample. The stored x0
   stays the one from 1.
3. UniP: extrapolate from the (corrected) sample to sigmas[i+1] with the x0 history.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from wanrt.schedulers.base import MultistepScheduler, log_snr


class _Interval(NamedTuple):
    """The step sigmas[end-1] -> sigmas[end] from sample x, shared by UniP and UniC."""

    first_order: Tensor  # the DDIM step: sigma_t/sigma_s0 * x - weight * x0_s0
    weight: Tensor  # alpha_t * B(h); scales every higher-order term
    h: Tensor  # lambda_t - lambda_s0 > 0
    b_h: Tensor  # B(h) = expm1(-h)
    slope: Tensor | None  # order 2: D_1 = (x0_s1 - x0_s0) / r_1
    ratio: Tensor | None  # order 2: r_1 = (lambda_s1 - lambda_s0) / h


class UniPCScheduler(MultistepScheduler):
    """UniPC-bh2 of order 2 in x0 form; the Wan2.2 default solver ('unipc')."""

    def reset(self) -> None:
        super().reset()
        self.last_sample: Tensor | None = None  # where the last UniP step started from
        self.last_order = 0  # and its order, which the next UniC repeats

    def _advance(self, model_output: Tensor, sample: Tensor, index: int) -> Tensor:
        x0 = self._predict_x0(model_output, sample, index)
        if self.last_sample is not None:
            sample = self._correct(x0, index)
        order = self._remember(x0, index)
        self.last_sample, self.last_order = sample, order
        return self._predict(sample, index, order)

    def _interval(self, x: Tensor, end: int, order: int) -> _Interval:
        """Call while x0_history[-1] is the x0 at sigmas[end-1] (and [-2] at sigmas[end-2])."""
        sigma_t, sigma_s0 = self.sigmas[end], self.sigmas[end - 1]
        lambda_s0 = log_snr(sigma_s0)
        h = log_snr(sigma_t) - lambda_s0
        # With bh2, B(h) = expm1(-h) is also the DDIM coefficient hh*phi_1(hh) (hh = -h), so
        # the DDIM step and the higher-order terms share one weight.
        b_h = torch.expm1(-h)
        weight = (1 - sigma_t) * b_h
        first_order = sigma_t / sigma_s0 * x - weight * self.x0_history[-1]
        if order == 1:
            return _Interval(first_order, weight, h, b_h, None, None)
        ratio = (log_snr(self.sigmas[end - 2]) - lambda_s0) / h
        slope = (self.x0_history[-2] - self.x0_history[-1]) / ratio
        return _Interval(first_order, weight, h, b_h, slope, ratio)

    def _predict(self, sample: Tensor, index: int, order: int) -> Tensor:
        """UniP: sigmas[index] -> sigmas[index+1]."""
        step = self._interval(sample, index + 1, order)
        if order == 1:
            return step.first_order
        # UniP-2 uses the fixed coefficient 1/2 (the official simplification), not a solve.
        return step.first_order - step.weight * (0.5 * step.slope)

    def _correct(self, x0: Tensor, index: int) -> Tensor:
        """UniC: redo last_sample at sigmas[index-1] -> sigmas[index], x0 being the model's
        prediction at the end of that step."""
        step = self._interval(self.last_sample, index, self.last_order)
        end_slope = x0 - self.x0_history[-1]
        if self.last_order == 1:
            return step.first_order - step.weight * (0.5 * end_slope)
        rho_previous, rho_end = _unic2_coefficients(step)
        return step.first_order - step.weight * (rho_previous * step.slope + rho_end * end_slope)


def _unic2_coefficients(step: _Interval) -> Tensor:
    """Solve the UniC-2 order conditions [[1, 1], [r_1, 1]] @ rho = b, where
    b_k = k! * hh*phi_{k+1}(hh) / B(h) with hh = -h, as a float32 2x2 solve like the official."""
    neg_h = -step.h
    h_phi = step.b_h / neg_h - 1  # hh*phi_2(hh), from phi_{k+1} = (phi_k - 1/k!) / hh
    b_1 = h_phi / step.b_h
    h_phi = h_phi / neg_h - 0.5  # hh*phi_3(hh)
    b_2 = 2 * h_phi / step.b_h
    one = torch.ones_like(step.ratio)
    conditions = torch.stack([torch.stack([one, one]), torch.stack([step.ratio, one])])
    return torch.linalg.solve(conditions, torch.stack([b_1, b_2]))
