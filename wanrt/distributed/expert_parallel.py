"""Expert per GPU: the A14B high-noise expert resident on rank 0, the low-noise one on rank 1.

Two consumer cards that cannot hold both experts (or would swap them every run) split the
schedule at the MoE boundary: rank 0 runs the steps up to it, sends the sampling state
(latents, conditioning and the multistep scheduler's history) to rank 1, which finishes
the run and sends the final latents back. Neither expert ever moves. With several jobs
(prompts, seeds, previews) the stages overlap: rank 0 runs job k+1's high-noise steps while
rank 1 runs job k's low-noise steps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from wanrt.distributed.launch import RankContext
from wanrt.loading.checkpoint import Expert
from wanrt.pipelines import Pipeline, ResolvedRequest, SamplingState, StepInfo, TextEmbeddings

HIGH_NOISE_RANK, LOW_NOISE_RANK = 0, 1
# The scheduler's schedule, which the receiving rank rebuilds from the request; every
# other attribute is the run's progress (step index, x0 history, UniPC's last sample).
_SCHEDULE_ATTRIBUTES = ("timesteps", "sigmas")


@dataclass(frozen=True)
class SamplingJob:
    request: ResolvedRequest
    embeddings: TextEmbeddings
    noise: Tensor | None = None


def _moved(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_moved(item, device) for item in value)
    return value


def boundary_step(pipeline: Pipeline, state: SamplingState) -> int:
    """Index of the first low-noise step (the number of steps when there is none)."""
    experts = [expert for _, expert in pipeline.schedule(state)]
    return experts.index(Expert.LOW_NOISE) if Expert.LOW_NOISE in experts else len(experts)


def _portable(state: SamplingState) -> dict[str, Any]:
    """What the other rank needs to continue `state`, with every tensor on the CPU."""
    conditioning = state.conditioning
    return {
        "request": state.request, "step": state.step, "latents": state.latents.cpu(),
        "conditioning": dataclasses.replace(conditioning, **{
            f.name: _moved(getattr(conditioning, f.name), "cpu") for f in dataclasses.fields(conditioning)}),
        "scheduler": {name: _moved(value, "cpu") for name, value in vars(state.scheduler).items()
                      if name not in _SCHEDULE_ATTRIBUTES},
    }


def _restored(pipeline: Pipeline, message: dict[str, Any]) -> SamplingState:
    request, device = message["request"], pipeline.device
    scheduler = pipeline.new_scheduler(request)
    vars(scheduler).update({name: _moved(value, device) for name, value in message["scheduler"].items()})
    conditioning = message["conditioning"]
    conditioning = dataclasses.replace(conditioning, **{
        f.name: _moved(getattr(conditioning, f.name), device) for f in dataclasses.fields(conditioning)})
    return SamplingState(request, message["latents"].to(device), scheduler, message["step"], conditioning)


def sample_pipelined(pipeline: Pipeline, context: RankContext, jobs: list[SamplingJob],
                     on_step: Callable[[StepInfo], None] | None = None) -> list[Tensor]:
    """Run `jobs` across the two ranks (call on both, with the same jobs). Rank 0 returns
    each job's final latents `[C, F, h, w]` (float32, CPU), in order; rank 1 returns []."""
    if context.world_size != 2:
        raise ValueError("expert-per-GPU sampling runs on exactly two ranks")
    if context.rank == LOW_NOISE_RANK:
        for job in jobs:
            state = pipeline.denoise(_restored(pipeline, context.recv(HIGH_NOISE_RANK)), job.embeddings,
                                     on_step=on_step)
            context.send(state.latents[0].float().cpu(), HIGH_NOISE_RANK)
        return []
    results: list[Tensor] = []
    for index, job in enumerate(jobs):
        state = pipeline.start(job.request, job.noise)
        state = pipeline.denoise(state, job.embeddings, stop=boundary_step(pipeline, state), on_step=on_step)
        # Collect the previous job before handing this one over: rank 1 sends job k-1's
        # result before it waits for job k, so neither rank blocks on the other's send.
        if index:
            results.append(context.recv(LOW_NOISE_RANK))
        context.send(_portable(state), LOW_NOISE_RANK)
    if jobs:
        results.append(context.recv(LOW_NOISE_RANK))
    return results
