"""A generation run over several processes: rank 0 leads, the other ranks follow.

Rank 0 runs the ordinary single-process code (`generate_video`: embedding cache, sampling,
decode, the files) on a `DistributedPipeline`, whose `encode_text` and `sample` first
broadcast the call to the other ranks; they run `serve`, which executes each call with
their share of the work (their tokens, their CFG branch, their FSDP shards, their expert)
until rank 0 says stop. Only rank 0 loads the VAE for decoding and writes anything.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Mapping, TypeVar

import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh

from wanrt.distributed.cfg_parallel import ParallelGuidance
from wanrt.distributed.config import ParallelConfig
from wanrt.distributed.expert_parallel import SamplingJob, sample_pipelined
from wanrt.distributed.launch import RankContext, agree_on_seed, check_agreement
from wanrt.distributed.sharding import fsdp_mesh, shard_dit, shard_t5
from wanrt.distributed.ulysses import SequenceParallelDiT
from wanrt.errors import InputError
from wanrt.generate import checkpoint_files_used
from wanrt.hashing import file_sha256, files_under, tensor_sha256
from wanrt.loading.checkpoint import Expert
from wanrt.models.dit import WanDiT
from wanrt.pipelines import GenerationRequest, Pipeline, ResolvedRequest, StepInfo, TextEmbeddings

Result = TypeVar("Result")


class _Call(str, Enum):
    ENCODE = "encode"
    SAMPLE = "sample"
    STOP = "stop"


@dataclass
class Parallelism:
    """The process groups of a run and what has been set up on this rank."""

    config: ParallelConfig
    context: RankContext
    ulysses_group: dist.ProcessGroup | None = None
    cfg_group: dist.ProcessGroup | None = None
    mesh: DeviceMesh | None = None
    t5_sharded: bool = False


def group_ranks(config: ParallelConfig) -> tuple[list[list[int]], list[list[int]]]:
    """(Ulysses groups, CFG groups): consecutive ranks form a Ulysses group, and the ranks at
    the same place in each Ulysses group form a CFG pair (cond on the first, uncond on the
    second), so with CFG parallel both branches see the same token split."""
    ulysses, cfg = config.ulysses_size, config.cfg_size
    ulysses_groups = [list(range(c * ulysses, (c + 1) * ulysses)) for c in range(cfg)] if ulysses > 1 else []
    cfg_groups = [[i + c * ulysses for c in range(cfg)] for i in range(ulysses)] if cfg > 1 else []
    return ulysses_groups, cfg_groups


def _groups(config: ParallelConfig, context: RankContext) -> Parallelism:
    """Every rank creates every group, in the same order (`new_group` is collective)."""
    parallelism = Parallelism(config, context)
    ulysses_groups, cfg_groups = group_ranks(config)
    for ranks in ulysses_groups:
        group = dist.new_group(ranks)
        if context.rank in ranks:
            parallelism.ulysses_group = group
    for ranks in cfg_groups:
        group = dist.new_group(ranks)
        if context.rank in ranks:
            parallelism.cfg_group = group
    if config.dit_fsdp or config.t5_fsdp:
        parallelism.mesh = fsdp_mesh(context.device, context.world_size)
    return parallelism


def parallelize(pipeline: Pipeline, config: ParallelConfig, context: RankContext) -> Parallelism:
    """Set this rank's pipeline up for `config` (call on every rank, before any sampling)."""
    if pipeline.wrap_expert is not None:
        raise InputError("multi-GPU runs use the PyTorch DiT; drop --engine")
    parallelism = _groups(config, context)
    if config.cfg_parallel:
        pipeline.guidance = ParallelGuidance(parallelism.cfg_group)
    if config.dit_fsdp:
        # The planner sizes a whole expert per device; a shard needs no streaming.
        pipeline.memory = None

    def wrap(expert: Expert, model: WanDiT):
        if config.dit_fsdp:
            shard_dit(model, parallelism.mesh, context.device)
            pipeline.wrapper_placed.add(expert)
        if parallelism.ulysses_group is not None:
            return SequenceParallelDiT(model, parallelism.ulysses_group)
        return model
    pipeline.wrap_expert = wrap
    return parallelism


def _encode_text(pipeline: Pipeline, parallelism: Parallelism, prompt: str, negative_prompt: str) -> TextEmbeddings:
    """T5 with its blocks sharded over every rank (all ranks call this together)."""
    encoder = pipeline.text_encoder
    if not parallelism.t5_sharded:
        shard_t5(encoder.encoder, parallelism.mesh)
        parallelism.t5_sharded = True
    cond, uncond = encoder([prompt, negative_prompt])
    return TextEmbeddings(cond.float().cpu(), uncond.float().cpu())


def _sample(pipeline: Pipeline, parallelism: Parallelism, request: ResolvedRequest, embeddings: TextEmbeddings,
            noise: Tensor | None, on_step: Callable[[StepInfo], None] | None) -> Tensor | None:
    """This rank's part of one sampling run; the latents on rank 0, None elsewhere."""
    if parallelism.config.expert_per_gpu:
        results = sample_pipelined(pipeline, parallelism.context, [SamplingJob(request, embeddings, noise)], on_step)
        return results[0] if results else None
    latents = pipeline.sample(request, embeddings, noise, on_step=on_step)
    return latents if parallelism.context.rank == 0 else None


class DistributedPipeline:
    """Rank 0's pipeline: a stand-in for `Pipeline` (every other attribute is the wrapped
    pipeline's) whose text encoding and sampling the other ranks join."""

    def __init__(self, pipeline: Pipeline, parallelism: Parallelism) -> None:
        self.pipeline = pipeline
        self.parallelism = parallelism

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipeline, name)

    def encode_text(self, prompt: str, negative_prompt: str) -> TextEmbeddings:
        if not self.parallelism.config.t5_fsdp:
            return self.pipeline.encode_text(prompt, negative_prompt)
        self.parallelism.context.broadcast((_Call.ENCODE, prompt, negative_prompt))
        return _encode_text(self.pipeline, self.parallelism, prompt, negative_prompt)

    def sample(self, request: GenerationRequest | ResolvedRequest, embeddings: TextEmbeddings | None = None,
               noise: Tensor | None = None, on_step: Callable[[StepInfo], None] | None = None) -> Tensor:
        if isinstance(request, GenerationRequest):
            request = request.resolved(self.pipeline.task)
        if embeddings is None:
            embeddings = self.encode_text(request.prompt, request.negative_prompt)
        self.parallelism.context.broadcast((_Call.SAMPLE, request, embeddings, noise))
        return _sample(self.pipeline, self.parallelism, request, embeddings, noise, on_step)

    def close(self) -> None:
        """Release the other ranks from `serve`."""
        self.parallelism.context.broadcast((_Call.STOP,))


def serve(pipeline: Pipeline, parallelism: Parallelism) -> None:
    """A non-zero rank's loop: run each call rank 0 broadcasts, until it stops."""
    while True:
        call, *arguments = parallelism.context.broadcast(src=0)
        if call is _Call.STOP:
            return
        if call is _Call.ENCODE:
            _encode_text(pipeline, parallelism, *arguments)
        else:
            _sample(pipeline, parallelism, *arguments, on_step=None)


def checkpoint_digests(pipeline: Pipeline) -> dict[str, str]:
    """SHA-256 of every file the run may read (memoised, so later runs only stat them), by
    path within its folder: nodes may mount the same checkpoint at different places."""
    digests = {}
    if pipeline.files is not None:
        for path in checkpoint_files_used(pipeline.files):
            digests[os.path.relpath(path, pipeline.files.root)] = file_sha256(path)
    if pipeline.quantized_files is not None:
        for folder in pipeline.quantized_files.dit_dirs.values():
            for path in files_under(folder):
                digests["quantized/" + os.path.relpath(path, pipeline.quantized_files.root)] = file_sha256(path)
    return digests


def run_on_ranks(context: RankContext, config: ParallelConfig, pipeline: Pipeline, request: GenerationRequest,
                 arguments: Mapping[str, Any], run_options: Mapping[str, Any],
                 lead: Callable[[DistributedPipeline, GenerationRequest, dict[str, Any]], Result],
                 prepare: Callable[[GenerationRequest], tuple[GenerationRequest, dict[str, Any]]] | None = None,
                 ) -> Result | None:
    """One generation on every rank: agree on arguments, seed and files, set the pipeline
    up, then rank 0 calls `lead(pipeline, request, run_options)` (e.g. `generate_video`)
    while the others serve it. Returns `lead`'s result on rank 0, None elsewhere.

    `prepare(request) -> (request, extra run options)` runs on rank 0 alone, after the seed is
    agreed (e.g. prompt extension: one model load or API call, not one per rank), and every
    rank takes its result."""
    image_digest = tensor_sha256(request.image) if request.image is not None else None
    check_agreement(context, {"arguments": {**arguments, "image pixels": image_digest},
                              "checkpoint files": checkpoint_digests(pipeline)})
    seed_was_random = request.seed < 0
    request = dataclasses.replace(request, seed=agree_on_seed(context, request.seed))
    prepared_options: dict[str, Any] = {}
    if prepare is not None:
        request, prepared_options = context.broadcast(prepare(request) if context.rank == 0 else None)
    parallelism = parallelize(pipeline, config, context)
    if context.rank != 0:
        serve(pipeline, parallelism)
        return None
    leader = DistributedPipeline(pipeline, parallelism)
    options = {**run_options, **prepared_options,
               "distributed": {**config.record(), "backend": context.backend, "seed_was_random": seed_was_random}}
    result = lead(leader, request, options)
    leader.close()
    return result
