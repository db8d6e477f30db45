"""Plain first-order Euler for flow matching (wanrt's addition; not in the official code).

It uses the UniPC schedule (first timestep 999) and the update x_next = x + (sigma_next -
sigma) * v, which is exact when the flow is a straight line (constant v).
"""

from __future__ import annotations

from torch import Tensor

from wanrt.schedulers.base import FlowScheduler


class EulerScheduler(FlowScheduler):
    """x_next = x + (sigmas[i+1] - sigmas[i]) * v; stateless apart from the step index."""

    def _advance(self, model_output: Tensor, sample: Tensor, index: int) -> Tensor:
        return sample + (self.sigmas[index + 1] - self.sigmas[index]) * model_output
