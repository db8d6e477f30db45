"""Schedulers: parity with the official UniPC and DPM++ golden fixtures, Euler's definition,
the step-index rules and the input errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURES, assert_parity, load_fixture

from wanrt.errors import InputError
from wanrt.schedulers import (
    DPMPPScheduler,
    EulerScheduler,
    Solver,
    UniPCScheduler,
    make_scheduler,
)

FIXTURE_NAMES = {Solver.UNIPC: "unipc", Solver.DPMPP: "dpmpp"}
CASES = [(solver, case) for solver, name in FIXTURE_NAMES.items()
         for case in json.loads((FIXTURES / "schedulers" / f"{name}.json").read_text())["cases"]]
CASE_IDS = [f"{FIXTURE_NAMES[solver]}-{case['tag']}" for solver, case in CASES]


@pytest.fixture(scope="module")
def golden() -> dict[Solver, dict[str, torch.Tensor]]:
    return {solver: load_fixture(f"schedulers/{name}")[0] for solver, name in FIXTURE_NAMES.items()}


def run(scheduler, sample: torch.Tensor, model_outputs: torch.Tensor) -> list[torch.Tensor]:
    """Step through every timestep as the pipelines do; returns each prev_sample."""
    samples = []
    for timestep, model_output in zip(scheduler.timesteps, model_outputs):
        sample = scheduler.step(model_output, timestep, sample)
        samples.append(sample)
    return samples


@pytest.mark.parametrize("solver, case", CASES, ids=CASE_IDS)
def test_matches_official(golden, solver, case):
    tensors, tag = golden[solver], case["tag"]
    scheduler = make_scheduler(solver, case["steps"], case["shift"])
    assert scheduler.timesteps.dtype == torch.int64
    assert torch.equal(scheduler.timesteps, tensors[f"{tag}.timesteps"])
    # Tolerance 0: the same float64 operations as numpy, then one rounding to float32.
    assert scheduler.sigmas.dtype == torch.float32
    assert torch.equal(scheduler.sigmas, tensors[f"{tag}.sigmas"])

    sample = tensors[f"{tag}.sample0"]
    for i, (timestep, model_output) in enumerate(zip(scheduler.timesteps, tensors[f"{tag}.model_outputs"])):
        sample = scheduler.step(model_output, timestep, sample)
        assert scheduler.step_index - 1 == case["step_index_used_per_call"][i]
        # max abs <= 1e-4 * max(1, max|ref|); measured: 0 (bit-exact) on every step.
        assert_parity(sample, tensors[f"{tag}.prev_samples"][i], f"{tag} step {i}")


@pytest.mark.parametrize("steps", [1, 2, 50])
@pytest.mark.parametrize("shift", [1.0, 5.0, 16.0])
def test_schedule_endpoints(steps, shift):
    # UniPC starts at the top of the training table (0.999, shifted), DPM++ at pure noise.
    for solver, first_timestep in [(Solver.UNIPC, 999), (Solver.EULER, 999), (Solver.DPMPP, 1000)]:
        scheduler = make_scheduler(solver, steps, shift)
        assert scheduler.timesteps.shape == (steps,) and scheduler.sigmas.shape == (steps + 1,)
        assert scheduler.timesteps[0] == first_timestep
        assert (scheduler.sigmas[0] == 1) == (solver == Solver.DPMPP)
        assert scheduler.sigmas[-1] == 0
        assert (scheduler.sigmas.diff() < 0).all()


def test_reset_replays_a_run(golden):
    tensors = golden[Solver.UNIPC]
    scheduler = make_scheduler(Solver.UNIPC, 10, 5.0)
    first = run(scheduler, tensors["s10_shift5.sample0"], tensors["s10_shift5.model_outputs"])
    scheduler.reset()
    second = run(scheduler, tensors["s10_shift5.sample0"], tensors["s10_shift5.model_outputs"])
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    with pytest.raises(InputError, match="past the last"):
        scheduler.step(tensors["s10_shift5.model_outputs"][0], scheduler.timesteps[-1], second[-1])


def test_first_step_looks_its_timestep_up():
    scheduler = make_scheduler(Solver.DPMPP, 10, 5.0)
    sample = torch.randn(1, 4, 2, 3, 3)
    scheduler.step(torch.randn_like(sample), scheduler.timesteps[3], sample)
    assert scheduler.step_index == 4
    # Later calls advance the counter whatever timestep they are given.
    scheduler.step(torch.randn_like(sample), scheduler.timesteps[0], sample)
    assert scheduler.step_index == 5
    # An explicit step_index skips the lookup.
    scheduler.reset()
    scheduler.step_index = 7
    scheduler.step(torch.randn_like(sample), scheduler.timesteps[0], sample)
    assert scheduler.step_index == 8
    scheduler.reset()
    with pytest.raises(InputError, match="timestep 1234 is not in the schedule"):
        scheduler.step(sample, 1234, sample)


def test_repeated_first_timestep_runs_to_the_end():
    # 100 steps at shift 12 truncate the two top sigmas to 999; the official lookup would
    # start at index 1 and fail on the last call.
    scheduler = make_scheduler(Solver.UNIPC, 100, 12.0)
    assert scheduler.timesteps[0] == scheduler.timesteps[1] == 999
    sample = torch.randn(1, 4, 2, 3, 3)
    samples = run(scheduler, sample, torch.randn(100, *sample.shape))
    assert scheduler.step_index == 100 and torch.isfinite(samples[-1]).all()


def test_euler_uses_the_unipc_schedule():
    euler, unipc = make_scheduler(Solver.EULER, 12, 7.0), make_scheduler(Solver.UNIPC, 12, 7.0)
    assert torch.equal(euler.timesteps, unipc.timesteps) and torch.equal(euler.sigmas, unipc.sigmas)


def test_euler_step_is_the_definition():
    scheduler = make_scheduler(Solver.EULER, 8, 5.0)
    sample, velocity = torch.randn(2, 16, 3, 4, 5), torch.randn(2, 16, 3, 4, 5)
    for i in range(2):
        expected = sample + (scheduler.sigmas[i + 1] - scheduler.sigmas[i]) * velocity
        sample = scheduler.step(velocity, scheduler.timesteps[i], sample)
        assert torch.equal(sample, expected)


def test_euler_integrates_a_straight_path():
    # With a constant velocity v = noise - x0 from x = (1-sigma_0) x0 + sigma_0 noise, the
    # steps telescope to x0 exactly; only float32 rounding remains (measured <= 1e-6).
    scheduler = make_scheduler(Solver.EULER, 20, 5.0)
    x0, noise = torch.randn(1, 16, 4, 8, 8), torch.randn(1, 16, 4, 8, 8)
    sigma_0 = scheduler.sigmas[0]
    final = run(scheduler, (1 - sigma_0) * x0 + sigma_0 * noise, (noise - x0).expand(20, *x0.shape))[-1]
    assert (final - x0).abs().max() <= 2e-6


def test_make_scheduler_accepts_names_and_members():
    assert isinstance(make_scheduler("unipc", 4, 5.0), UniPCScheduler)
    assert isinstance(make_scheduler("dpm++", 4, 5.0), DPMPPScheduler)
    assert isinstance(make_scheduler(Solver.EULER, 4, 5.0), EulerScheduler)


def test_input_errors():
    with pytest.raises(InputError, match=r"solver 'heun' is unknown; choose one of unipc, dpm\+\+, euler"):
        make_scheduler("heun", 10, 5.0)
    with pytest.raises(InputError, match="at least 1, got 0"):
        make_scheduler(Solver.UNIPC, 0, 5.0)
    with pytest.raises(InputError, match="positive, got 0"):
        make_scheduler(Solver.DPMPP, 10, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("solver", list(FIXTURE_NAMES))
def test_cuda_samples_with_cpu_sigmas(golden, solver):
    tensors, device = golden[solver], torch.device("cuda")
    scheduler = make_scheduler(solver, 40, 12.0, device=device)
    assert scheduler.timesteps.device.type == "cuda" and scheduler.sigmas.device.type == "cpu"
    outputs = run(scheduler, tensors["s40_shift12.sample0"].to(device), tensors["s40_shift12.model_outputs"].to(device))
    for i, output in enumerate(outputs):
        assert output.device.type == "cuda"
        assert_parity(output.cpu(), tensors["s40_shift12.prev_samples"][i], f"cuda step {i}", rtol=1e-6)
