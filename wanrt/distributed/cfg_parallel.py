"""CFG parallel: the conditional and the unconditional forward of a step on two ranks.

The two forwards of classifier-free guidance are independent, so two ranks (or two
Ulysses groups) run one each and exchange the predictions; both then combine them
identically and take the same scheduler step, so their latents never diverge.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from wanrt.pipelines import Guidance


class ParallelGuidance(Guidance):
    """`pipeline.guidance` for a rank of a two-rank CFG group: rank 0 of the group runs the
    prompt, rank 1 the negative prompt."""

    forwards_per_step = 1

    def __init__(self, group: dist.ProcessGroup) -> None:
        if dist.get_world_size(group) != 2:
            raise ValueError("CFG parallel needs a group of exactly two ranks")
        self.group = group
        self.runs_cond = dist.get_rank(group) == 0

    def __call__(self, forward: Callable[..., Tensor], latents: Tensor, timestep: Tensor, cond: Tensor,
                 uncond: Tensor, y: Tensor | None, scale: float) -> Tensor:
        prediction = forward(latents, timestep, cond if self.runs_cond else uncond, y=y)
        pred_cond, pred_uncond = (torch.empty_like(prediction) for _ in range(2))
        dist.all_gather([pred_cond, pred_uncond], prediction.contiguous(), group=self.group)
        return pred_uncond + scale * (pred_cond - pred_uncond)
