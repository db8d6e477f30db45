"""Worker of tests/test_distributed.py, run as 2 torchrun processes (gloo, CPU, float32).

Each rank compares every parallel mode with the single-process result it computes itself
and writes the errors to `<out>/rank<R>.json`; the test asserts on them. One launch checks
everything, since starting torch processes dominates the time.

usage: torchrun --standalone --nproc_per_node 2 distributed_worker.py OUT CHECKPOINTS_JSON
(with 4 processes it checks CFG parallel combined with Ulysses and FSDP instead)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from wanrt.configs import get_task
from wanrt.distributed.config import ParallelConfig
from wanrt.distributed.expert_parallel import SamplingJob, sample_pipelined
from wanrt.distributed.generation import parallelize, run_on_ranks
from wanrt.distributed.launch import RankContext, RankMismatchError, agree_on_seed, check_agreement, run_rank
from wanrt.distributed.sharding import fsdp_mesh, shard_dit, shard_t5
from wanrt.distributed.ulysses import SequenceParallelDiT
from wanrt.models.dit import WanDiT
from wanrt.models.t5 import UMT5Encoder
from wanrt.pipelines import GenerationRequest, Pipeline, TextEmbeddings
from wanrt.random_weights import randomize_


def error(actual: torch.Tensor, expected: torch.Tensor) -> dict[str, float]:
    """Max abs error and the reference's scale (max |expected|), for a relative bound."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return {"max_abs": (actual.double() - expected.double()).abs().max().item(),
            "scale": expected.abs().max().item(), "finite": bool(torch.isfinite(actual).all())}


def dit_cases() -> dict[str, tuple[str, dict]]:
    """(task, inputs) whose token counts are odd (padded to a multiple of 2) or even."""
    generator = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)
    per_token = torch.full((1, 45), 700)
    per_token[:, :15] = 0  # ti2v: the image frame's tokens at t=0
    return {
        "t2v_45_tokens_padded": ("tiny-t2v", dict(x=randn(1, 16, 3, 6, 10), timestep=torch.tensor([500]),
                                                  context=randn(1, 7, 32))),
        "i2v_48_tokens_with_y": ("tiny-i2v", dict(x=randn(1, 16, 3, 8, 8), timestep=torch.tensor([900]),
                                                  context=randn(1, 16, 32), y=randn(1, 20, 3, 8, 8))),
        "ti2v_45_tokens_per_token_t": ("tiny-ti2v", dict(x=randn(1, 48, 3, 6, 10), timestep=per_token,
                                                         context=randn(1, 5, 32))),
    }


@torch.no_grad()
def check_dit(mesh) -> dict:
    """Ulysses, FSDP and both, on the bare DiT against its plain forward."""
    results = {}
    world = dist.group.WORLD
    for name, (task, inputs) in dit_cases().items():
        model = randomize_(WanDiT(get_task(task).dit), seed=5)
        expected = model(**inputs)
        results[f"ulysses/{name}"] = error(SequenceParallelDiT(copy.deepcopy(model), world)(**inputs), expected)
        sharded = shard_dit(copy.deepcopy(model), mesh, torch.device("cpu"))
        results[f"fsdp/{name}"] = error(sharded(**inputs), expected)
        both = SequenceParallelDiT(shard_dit(copy.deepcopy(model), mesh, torch.device("cpu")), world)
        results[f"ulysses+fsdp/{name}"] = error(both(**inputs), expected)
    # bf16 linears beside float32 modulation, as checkpoints load: FSDP gathers mixed dtypes.
    task, inputs = dit_cases()["i2v_48_tokens_with_y"]
    mixed = randomize_(WanDiT(get_task(task).dit), seed=6).to(torch.bfloat16)
    for block in mixed.blocks:
        block.modulation.data = block.modulation.data.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = mixed(**inputs)
        results["fsdp/bf16_with_fp32_modulation"] = error(
            shard_dit(copy.deepcopy(mixed), mesh, torch.device("cpu"))(**inputs), expected)
    return results


@torch.no_grad()
def check_t5(mesh) -> dict:
    encoder = randomize_(UMT5Encoder(get_task("tiny-t2v").t5), seed=7)
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 256, (2, 16), generator=generator)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 9:] = 0
    expected = encoder(ids, mask)
    return {"fsdp/t5": error(shard_t5(copy.deepcopy(encoder), mesh)(ids, mask), expected)}


def embeddings(seed: int) -> TextEmbeddings:
    generator = torch.Generator().manual_seed(seed)
    return TextEmbeddings(torch.randn(6, 32, generator=generator), torch.randn(11, 32, generator=generator))


def image() -> torch.Tensor:
    return torch.rand(3, 72, 100, generator=torch.Generator().manual_seed(4)) * 2 - 1


def check_pipelines(context: RankContext, checkpoints: dict[str, str]) -> dict:
    """Whole sampling runs (both experts, UniPC history, conditioning) per mode."""
    def pipeline(task: str) -> Pipeline:
        return Pipeline.from_pretrained(checkpoints[task], task, device="cpu")

    cases = {
        # (task, request, config)
        "ulysses/ti2v_with_image": ("tiny-ti2v", GenerationRequest("", seed=3, image=image()),
                                    ParallelConfig(2, ulysses_size=2)),
        "ulysses+dit_fsdp/i2v": ("tiny-i2v", GenerationRequest("", seed=5, image=image()),
                                 ParallelConfig(2, ulysses_size=2, dit_fsdp=True)),
        "cfg_parallel/t2v": ("tiny-t2v", GenerationRequest("", seed=7, guide_scale=(3.0, 4.5)),
                             ParallelConfig(2, cfg_parallel=True)),
    }
    results = {}
    for name, (task, request, config) in cases.items():
        expected = pipeline(task).sample(request, embeddings(1))
        parallel = pipeline(task)
        parallelize(parallel, config, context)
        results[name] = error(parallel.sample(request, embeddings(1)), expected)
    return results


def check_expert_per_gpu(context: RankContext, checkpoints: dict[str, str]) -> dict:
    """Three jobs through the two-stage pipeline must equal single-device runs exactly."""
    task = get_task("tiny-t2v")
    jobs = [SamplingJob(GenerationRequest("", seed=seed, solver=solver).resolved(task), embeddings(seed))
            for seed, solver in ((11, "unipc"), (12, "dpm++"), (13, "unipc"))]
    pipeline = Pipeline.from_pretrained(checkpoints["tiny-t2v"], "tiny-t2v", device="cpu")
    outputs = sample_pipelined(pipeline, context, jobs)
    loaded = sorted(name for name in pipeline.load_seconds if name.startswith("dit_"))
    if context.rank != 0:
        return {"expert/jobs_returned": len(outputs), "expert/loaded": loaded}
    reference = Pipeline.from_pretrained(checkpoints["tiny-t2v"], "tiny-t2v", device="cpu")
    results = {"expert/jobs_returned": len(outputs), "expert/loaded": loaded}
    for index, (out, job) in enumerate(zip(outputs, jobs)):
        expected = reference.sample(job.request, job.embeddings)
        results[f"expert/job{index}"] = {**error(out, expected), "equal": torch.equal(out, expected)}
    return results


def check_generation_protocol(context: RankContext, checkpoints: dict[str, str]) -> dict:
    """`run_on_ranks`: rank 0 leads (T5 sharded, CFG split, expert per rank) while rank 1
    serves, and rank 0 alone prepares the request (as prompt extension does); the latents
    equal a single-process run of the prepared prompt with the same (agreed) seed."""
    results = {}
    prepared_seeds = []

    def extend(request: GenerationRequest) -> tuple[GenerationRequest, dict]:
        prepared_seeds.append(request.seed)
        return dataclasses.replace(request, prompt=f"{request.prompt} at sunset"), {"prompt_extend": "recorded"}
    for name, config in (("cfg_parallel+t5_fsdp", ParallelConfig(2, cfg_parallel=True, t5_fsdp=True)),
                         ("expert_per_gpu", ParallelConfig(2, expert_per_gpu=True))):
        request = GenerationRequest("a cat on the beach", seed=-1, steps=4)
        pipeline = Pipeline.from_pretrained(checkpoints["tiny-t2v"], "tiny-t2v", device="cpu")
        outcome = run_on_ranks(context, config, pipeline, request, {"case": name}, {},
                               lambda leader, agreed, options: (leader.sample(agreed), agreed.seed, options),
                               prepare=extend)
        if context.rank == 0:
            latents, seed, options = outcome
            reference = Pipeline.from_pretrained(checkpoints["tiny-t2v"], "tiny-t2v", device="cpu")
            expected = reference.sample(GenerationRequest("a cat on the beach at sunset", seed=seed, steps=4))
            results[f"generation/{name}"] = {**error(latents, expected), "options": options["distributed"],
                                             "prepared": options["prompt_extend"], "seed": seed}
        else:
            results[f"generation/{name}"] = {"served": outcome is None}
    results["generation/prepared_seeds"] = prepared_seeds
    return results


def check_agreement_and_seed(context: RankContext) -> dict:
    seeds = [None, None]
    dist.all_gather_object(seeds, agree_on_seed(context, -1))
    try:
        check_agreement(context, {"arguments": {"prompt": "same"}, "checkpoint files": {"a": str(context.rank)}})
        mismatch = None
    except RankMismatchError as raised:
        mismatch = str(raised)
    check_agreement(context, {"arguments": {"prompt": "same"}})  # equal parts pass
    return {"seed/all_ranks": seeds, "agreement/mismatch": mismatch}


def check_cfg_parallel_with_ulysses(context: RankContext, checkpoints: dict[str, str]) -> dict:
    """4 ranks: two CFG branches, each over a Ulysses pair, with the DiT sharded over all 4."""
    request = GenerationRequest("", seed=9, image=image())
    expected = Pipeline.from_pretrained(checkpoints["tiny-i2v"], "tiny-i2v", device="cpu").sample(
        request, embeddings(2))
    parallel = Pipeline.from_pretrained(checkpoints["tiny-i2v"], "tiny-i2v", device="cpu")
    parallelize(parallel, ParallelConfig(4, ulysses_size=2, cfg_parallel=True, dit_fsdp=True), context)
    return {"cfg_parallel+ulysses+dit_fsdp/i2v": error(parallel.sample(request, embeddings(2)), expected)}


def main(context: RankContext) -> None:
    out, checkpoints = Path(sys.argv[1]), json.loads(sys.argv[2])
    if context.world_size == 4:
        results = check_cfg_parallel_with_ulysses(context, checkpoints)
        (out / f"rank{context.rank}.json").write_text(json.dumps(results, indent=1))
        return
    mesh = fsdp_mesh(context.device, context.world_size)
    results = {**check_dit(mesh), **check_t5(mesh), **check_pipelines(context, checkpoints),
               **check_expert_per_gpu(context, checkpoints), **check_generation_protocol(context, checkpoints),
               **check_agreement_and_seed(context)}
    (out / f"rank{context.rank}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    run_rank(main, torch.device("cpu"))
