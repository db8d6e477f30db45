"""Multi-process runs on the CPU: 2 torchrun processes over gloo, float32, tiny models.

Every parallel mode is compared with the single-process result. Bound: max abs error
<= 1e-5 x max(1, max |reference|); on the CPU the modes measure 0.0 (bit-identical), so
the bound only leaves room for other BLAS builds. Expert-per-GPU must be exactly equal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner
from wanrt.cli.app import app

from wanrt.configs import get_task
from wanrt.distributed.config import ParallelConfig
from wanrt.distributed.generation import group_ranks
from wanrt.errors import InputError
from wanrt.generate import read_latents
from wanrt.pipelines import GenerationRequest, Pipeline

TESTS = Path(__file__).parent
PARALLEL_RTOL = 1e-5
PROMPT = "a dog walking in the city"
# Start-up of two torch processes is most of each launch; this bounds a hang, not speed.
LAUNCH_TIMEOUT_S = 240


def torchrun(*arguments: str, env: dict[str, str], nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), *arguments], capture_output=True, text=True, env={**os.environ, **env},
                          timeout=LAUNCH_TIMEOUT_S)


def run_worker(checkpoints: dict[str, Path], out: Path, nproc: int) -> list[dict]:
    """Run tests/distributed_worker.py once; the results of each rank."""
    paths = {name: str(path) for name, path in checkpoints.items()}
    done = torchrun(str(TESTS / "distributed_worker.py"), str(out), json.dumps(paths),
                    env={"WANRT_CACHE_DIR": str(out / "cache")}, nproc=nproc)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(nproc)]


@pytest.fixture(scope="module")
def worker_results(checkpoints, tmp_path_factory) -> list[dict]:
    return run_worker(checkpoints, tmp_path_factory.mktemp("distributed"), nproc=2)


def assert_within_bound(name: str, measured: dict) -> None:
    assert measured["finite"], name
    bound = PARALLEL_RTOL * max(1.0, measured["scale"])
    assert measured["max_abs"] <= bound, f"{name}: max abs error {measured['max_abs']:.3g} > {bound:.3g}"


@pytest.mark.parametrize("prefix", ["ulysses/", "fsdp/", "ulysses+fsdp/"])
def test_dit_and_t5_under_ulysses_and_fsdp_equal_the_plain_forward(worker_results, prefix):
    """Ulysses with odd token counts (padded 45 -> 46), i2v's y, ti2v's per-token
    timesteps; FSDP with float32 modulation beside bf16 linears, and T5 sharded."""
    for rank, results in enumerate(worker_results):
        cases = {name: value for name, value in results.items() if name.startswith(prefix)}
        assert len(cases) >= 3, cases
        for name, measured in cases.items():
            assert_within_bound(f"rank {rank} {name}", measured)


@pytest.mark.parametrize("name", ["ulysses/ti2v_with_image", "ulysses+dit_fsdp/i2v", "cfg_parallel/t2v"])
def test_sampling_runs_equal_the_single_process_run(worker_results, name):
    for results in worker_results:
        assert_within_bound(name, results[name])


def test_expert_per_gpu_equals_the_single_device_runs_exactly(worker_results):
    """Three jobs, pipelined over the two stages; each rank loaded only its expert."""
    rank0, rank1 = worker_results
    assert (rank0["expert/jobs_returned"], rank1["expert/jobs_returned"]) == (3, 0)
    assert (rank0["expert/loaded"], rank1["expert/loaded"]) == (["dit_high_noise"], ["dit_low_noise"])
    for index in range(3):
        assert rank0[f"expert/job{index}"]["equal"], rank0[f"expert/job{index}"]


@pytest.mark.parametrize("name", ["cfg_parallel+t5_fsdp", "expert_per_gpu"])
def test_rank0_leads_a_generation_the_other_rank_serves(worker_results, name):
    rank0, rank1 = worker_results
    assert_within_bound(name, rank0[f"generation/{name}"])
    assert rank0[f"generation/{name}"]["options"]["world_size"] == 2
    assert rank0[f"generation/{name}"]["options"]["seed_was_random"] is True
    assert rank1[f"generation/{name}"] == {"served": True}


def test_rank0_alone_prepares_the_request_with_the_agreed_seed(worker_results):
    """Prompt extension's path: one extension on rank 0, after the seed is agreed; every rank
    sampled the prepared prompt (the latents equal a single-process run of it, above)."""
    rank0, rank1 = worker_results
    seeds = [rank0[f"generation/{name}"]["seed"] for name in ("cfg_parallel+t5_fsdp", "expert_per_gpu")]
    assert rank0["generation/prepared_seeds"] == seeds and min(seeds) >= 0
    assert rank1["generation/prepared_seeds"] == []
    assert rank0["generation/expert_per_gpu"]["prepared"] == "recorded"


def test_ranks_agree_on_a_random_seed_and_refuse_different_files(worker_results):
    rank0, rank1 = worker_results
    assert rank0["seed/all_ranks"] == rank1["seed/all_ranks"]
    assert len(set(rank0["seed/all_ranks"])) == 1 and rank0["seed/all_ranks"][0] >= 0
    for results in worker_results:
        message = results["agreement/mismatch"]
        assert message and "checkpoint files" in message and "rank(s) 1" in message


def test_cfg_parallel_combines_with_ulysses_and_fsdp_on_4_processes(checkpoints, tmp_path):
    for results in run_worker(checkpoints, tmp_path, nproc=4):
        assert_within_bound("cfg_parallel+ulysses+dit_fsdp/i2v", results["cfg_parallel+ulysses+dit_fsdp/i2v"])


def test_ulysses_groups_are_consecutive_and_cfg_pairs_span_them():
    assert group_ranks(ParallelConfig(4, ulysses_size=2, cfg_parallel=True)) == ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    assert group_ranks(ParallelConfig(8, ulysses_size=8)) == ([list(range(8))], [])
    assert group_ranks(ParallelConfig(2, cfg_parallel=True)) == ([], [[0, 1]])


def test_a_failing_rank_stops_every_rank_with_its_message_on_rank0(tmp_path):
    started = time.monotonic()
    done = torchrun("--log-dir", str(tmp_path), "--redirects", "3",
                    str(TESTS / "distributed_failure_worker.py"), env={})
    elapsed = time.monotonic() - started
    assert done.returncode != 0
    assert elapsed < 30, f"the ranks took {elapsed:.0f} s to stop"
    rank0_stderr = next(tmp_path.rglob("attempt_0/0/stderr.log")).read_text()
    assert "error: rank 1: RuntimeError: injected failure: the low-noise expert ran out of memory" in rank0_stderr


def test_relaunched_ranks_that_fail_give_rank0s_exit_code_and_one_message(tmp_path):
    """What `--gpus 2` runs after its own checks: here every rank raises a CheckpointError."""
    output = tmp_path / "out" / "out.mp4"
    arguments = ["generate", "--task", "tiny-t2v", "--ckpt-dir", str(tmp_path / "missing"), "--prompt", PROMPT,
                 "--device", "cpu", "--output", str(output)]
    done = subprocess.run([sys.executable, "-c", "import sys; from wanrt.distributed.launch import relaunch; "
                           f"sys.exit(relaunch(2, {arguments!r}))"],
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 2, done.stderr[-4000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "checkpoint folder not found; check --ckpt-dir" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not output.parent.exists()


def test_generate_on_two_processes_writes_one_video_from_rank0(checkpoints, tmp_path):
    """`--gpus 2` re-launches under torchrun (official spellings passed through); the
    latents equal a single-process run and only rank 0 writes."""
    output = tmp_path / "video" / "out.mp4"
    done = subprocess.run(
        [sys.executable, "-m", "wanrt", "generate", "--gpus", "2", "--device", "cpu", "--task", "tiny-t2v",
         "--ckpt_dir", str(checkpoints["tiny-t2v"]), "--prompt", PROMPT, "--frame_num", "9",
         "--sample_steps", "3", "--base_seed", "7", "--ulysses_size", "2", "--dit_fsdp", "--t5_fsdp",
         "--save_file", str(output)],
        capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
        env={**os.environ, "WANRT_CACHE_DIR": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr[-4000:]
    assert sorted(path.name for path in output.parent.iterdir()) == ["out.json", "out.latents.safetensors", "out.mp4"]
    assert done.stdout.count("video:") == 1
    sidecar = json.loads(output.with_suffix(".json").read_text())
    assert sidecar["options"]["distributed"]["mode"] == "ulysses2+dit-fsdp+t5-fsdp"
    assert sidecar["options"]["distributed"]["world_size"] == 2
    single = Pipeline.from_pretrained(checkpoints["tiny-t2v"], "tiny-t2v", device="cpu")
    expected = single.sample(GenerationRequest(PROMPT, frame_num=9, steps=3, seed=7))
    latents = read_latents(output.with_suffix(".latents.safetensors"))[0]
    error = (latents - expected).abs().max().item()
    assert error <= PARALLEL_RTOL * max(1.0, expected.abs().max().item()), error


@pytest.mark.parametrize("task,extra,needles", [
    ("tiny-t2v", ["--gpus", 2, "--ulysses", 3], ["--ulysses 3", "4 attention heads"]),
    ("tiny-ti2v", ["--gpus", 2, "--expert-per-gpu"], ["--expert-per-gpu", "single DiT"]),
    ("tiny-t2v", ["--gpus", 3, "--cfg-parallel"], ["--cfg-parallel", "odd"]),
    ("tiny-t2v", ["--ulysses", 2], ["--ulysses", "--gpus 2"]),
    ("tiny-t2v", ["--gpus", 2, "--dit-fsdp", "--precision", "int8"], ["--dit-fsdp", "--precision int8"]),
])
def test_impossible_splits_are_refused_before_launching(checkpoints, tmp_path, task, extra, needles, cache_dir):
    output = tmp_path / "out" / "out.mp4"
    result = CliRunner().invoke(app, [str(arg) for arg in (
        "generate", "--task", task, "--ckpt-dir", checkpoints[task], "--prompt", PROMPT, "--device", "cpu",
        "--output", output, *extra)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]
    assert not output.parent.exists()


def test_more_processes_than_gpus_are_refused(checkpoints, tmp_path, cache_dir):
    result = CliRunner().invoke(app, [str(arg) for arg in (
        "generate", "--task", "tiny-t2v", "--ckpt-dir", checkpoints["tiny-t2v"], "--prompt", PROMPT,
        "--output", tmp_path / "out.mp4", "--gpus", 64)])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: --gpus 64: this machine has") and "--device cpu" in result.stderr


def test_unset_ulysses_takes_the_ranks_left_and_modes_are_named():
    task = get_task("tiny-t2v")
    assert ParallelConfig.from_options(4, cfg_parallel=True).check(task).ulysses_size == 2
    assert ParallelConfig.from_options(2).check(task).mode() == "ulysses2"
    assert ParallelConfig.from_options(2, expert_per_gpu=True).check(task).mode() == "expert-per-gpu"
    assert ParallelConfig.from_options(2, ulysses_size=1, dit_fsdp=True).check(task).mode() == "dit-fsdp"
    with pytest.raises(InputError, match="--ulysses 1 x 2"):
        ParallelConfig.from_options(4, ulysses_size=1, cfg_parallel=True).check(task)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("mode", [["--ulysses", "2", "--dit-fsdp", "--t5-fsdp"], ["--cfg-parallel"],
                                  ["--expert-per-gpu"]])
def test_generate_on_two_gpus_matches_one_gpu(checkpoints, tmp_path, mode):
    """The NCCL path: float32 so the comparison is not bf16 rounding; the bound allows for
    different GEMM tilings of a split sequence."""
    def generate(name: str, *extra: str) -> torch.Tensor:
        output = tmp_path / name / "out.mp4"
        done = subprocess.run(
            [sys.executable, "-m", "wanrt", "generate", "--task", "tiny-t2v",
             "--ckpt-dir", str(checkpoints["tiny-t2v"]), "--prompt", PROMPT, "--frame-num", "9", "--steps", "4", "--seed", "3", "--dtype", "fp32",
             "--output", str(output), *extra],
            capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
            env={**os.environ, "WANRT_CACHE_DIR": str(tmp_path / "cache")})
        assert done.returncode == 0, done.stderr[-4000:]
        return read_latents(output.with_suffix(".latents.safetensors"))[0]
    expected = generate("single")
    latents = generate("parallel", "--gpus", "2", *mode)
    error = (latents - expected).abs().max().item()
    assert error <= 1e-3 * max(1.0, expected.abs().max().item()), error
