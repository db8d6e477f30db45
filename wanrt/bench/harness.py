"""Run benchmark scenarios: wanrt and its baselines one after another in the same process,
on the same device, with the same weights, noise and text embeddings; collect one report.

Per scenario the runs are: `wanrt` (the scenario's precision and planned placement),
`official` (the official code's strategy: bf16 experts moved whole, no streaming) and
`diffusers` (`diffusers.WanPipeline` with its own offload). Model building, weight
conversion and offload set-up happen before a run's measured phases; a VRAM cap applies
to the measured phases of every run alike. A baseline that cannot run (not installed,
out of memory under the cap, not fitting the plan) is recorded with its reason and the
report goes on.
"""

from __future__ import annotations

import gc
import importlib.metadata
import math
import os
import platform
import subprocess
import sys
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from wanrt.errors import InputError, WanrtError
from wanrt.pipelines import GenerationRequest, Pipeline, ResolvedRequest, TextEmbeddings, noise_for

from wanrt.bench.baselines import BaselineSkipped, DiffusersBaseline
from wanrt.bench.flops import RunFlops, device_peak, run_flops
from wanrt.bench.measure import MemorySampler, RunRecorder, steady_step_seconds
from wanrt.bench.models import ModelSource, Strategy, conditioning_image
from wanrt.bench.scenarios import Baseline, Scenario, Weights

GIB = 2**30
REPORT_FORMAT = "wanrt-bench/1"
CPU_NOTE = "CPU-only: tiny scenarios prove the harness; no performance claim"
RANDOM_WEIGHTS_NOTE = "random weights: timings and memory only; the videos are noise, never a quality result"
DEFINITIONS = {
    "speedup": "baseline seconds / wanrt seconds for the same phase (above 1: wanrt is faster)",
    "peak_vram_ratio": "wanrt peak allocated VRAM / baseline peak allocated VRAM (below 1: wanrt uses less)",
    "flops": "model FLOPs (2 per multiply-add) of matmuls and convolutions; DiT and T5 analytic, "
             "VAE decode counted with FlopCounterMode on the meta device",
    "achieved_tflops": "component FLOPs / measured seconds of that component",
    "dit achieved_tflops": "sampling FLOPs / time inside the DiT forwards",
    "h2d_gb_per_s": "bytes the block streamer copied host->device / sampling seconds (effective rate)",
    "fidelity": "against the reference run: relative L2 and max |diff| of the final latents, PSNR of "
                "the decoded video in [-1, 1] (peak-to-peak 2)",
    "times": "CUDA events on a GPU, time.perf_counter on a CPU",
    "phases": "t5: both prompts encoded (T5 to the device and back); sampling: first latents (for i2v "
              "the image's VAE encode) to the last step, expert swaps and streaming included; decode: "
              "the VAE decode to host frames",
}
# Runs that the `fidelity` of the others is measured against, in order of preference.
_REFERENCES = (Baseline.OFFICIAL.value, Strategy.WANRT.value)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on: device, host and software versions."""
    info: dict[str, Any] = {"device": {"type": device.type, "name": device_name(device)}}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device"].update(total_memory_bytes=props.total_memory, compute_capability=f"{props.major}.{props.minor}",
                              multiprocessors=props.multi_processor_count,
                              tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    peak = device_peak(info["device"]["name"]) if device.type == "cuda" else None
    info["device"]["peak_tflops"] = ({"table_entry": peak.name, "bf16": peak.bf16, "fp8": peak.fp8,
                                      "int8": peak.int8} if peak else "unknown")
    info["host"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "ram_bytes": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"),
                    "torch_threads": torch.get_num_threads()}
    info["versions"] = {"python": sys.version.split()[0], "torch": torch.__version__, "wanrt": _version("wanrt"),
                        "diffusers": _version("diffusers"), "matplotlib": _version("matplotlib"),
                        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                        "git_commit": _git_commit()}
    return info


def check_runnable(scenarios: tuple[Scenario, ...], device: torch.device) -> None:
    """Full-size models need a GPU; refuse before anything is built."""
    if device.type == "cuda":
        return
    full_size = [s.name for s in scenarios if not s.task.startswith("tiny-")]
    if full_size:
        raise InputError(f"scenario(s) {', '.join(full_size)} use full-size models and need a CUDA device; "
                         "on a CPU-only machine run tiny-t2v/tiny-i2v/tiny-ti2v scenarios (or no --task/--scenario)")


@contextmanager
def vram_cap(device: torch.device, vram_gib: float | None) -> Iterator[None]:
    """Cap what this process may allocate on the GPU (GPU only; a no-op elsewhere)."""
    if device.type != "cuda" or vram_gib is None:
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, vram_gib * GIB / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def _free_memory(device: torch.device) -> None:
    """Between runs: collect the last run's models (streaming hooks make reference cycles)
    and hand cached device and pinned host memory back, so the next run starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        # Pinned host buffers stay cached by the allocator otherwise (torch >= 2.12 only).
        empty_host_cache = getattr(torch.accelerator, "empty_host_cache", None)
        if empty_host_cache is not None:
            empty_host_cache()


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


# ---------------------------------------------------------------------- one run


class _Outputs:
    """What a run produced, kept only to measure the other runs' fidelity against."""

    def __init__(self, latents: Tensor, video: Tensor) -> None:
        self.latents, self.video = latents, video


def summarize(phases: dict[str, dict], steps: list[dict], flops: RunFlops, peak: float | None) -> dict[str, Any]:
    """Totals, rates and achieved TFLOP/s of a run from its phases and steps."""
    sampling = phases.get("sampling", {}).get("seconds")
    dit_seconds = sum(step["dit_forward_seconds"] for step in steps)
    dit_flops = sum(step["dit_flops"] for step in steps)
    streamed = sum(step["streamed_bytes"] for step in steps)
    achieved = {
        "t5": flops.t5 / phases["t5"]["seconds"] / 1e12 if "t5" in phases else None,
        "dit": dit_flops / dit_seconds / 1e12 if dit_seconds > 0 else None,
        "sampling": flops.sampling / sampling / 1e12 if sampling else None,
        "vae_decode": flops.vae_decode / phases["decode"]["seconds"] / 1e12 if "decode" in phases else None,
    }
    return {
        "steps": len(steps), "dit_forward_seconds": dit_seconds, "steady_step_seconds": steady_step_seconds(steps),
        "streamed_bytes": streamed, "h2d_gb_per_s": streamed / sampling / 1e9 if streamed and sampling else None,
        "achieved_tflops": achieved, "peak_tflops": peak,
        "dit_fraction_of_peak": achieved["dit"] / peak if peak and achieved["dit"] else None,
    }


def _matmul_precision(runner: str, scenario: Scenario, device: torch.device) -> str:
    """What the DiT matmuls run in: what the device peak is looked up for."""
    if device.type != "cuda":
        return "fp32"
    if runner != Strategy.WANRT.value or scenario.precision.value == "bf16":
        return "bf16"
    from wanrt.export.quantize import Kernel, w8a8_available

    kernel = Kernel.SCALED_MM if scenario.precision.value == "fp8" else Kernel.INT_MM
    return scenario.precision.value if w8a8_available(kernel, device) else "bf16"


def _placement(pipeline: Pipeline, strategy: Strategy) -> dict[str, Any]:
    if strategy is Strategy.OFFICIAL:
        return {"dit": "whole experts moved to the device, one at a time (official strategy)"}
    if pipeline.plan is not None:
        return {"dit": "planned", "plan": pipeline.plan.to_dict()}
    if pipeline.streaming is not None:
        return {"dit": f"{pipeline.streaming.resident_blocks} resident blocks, the rest streamed (resident_blocks)"}
    return {"dit": "whole experts moved to the device, one at a time (no budget to plan within)"}


def measure_pipeline(source: ModelSource, strategy: Strategy, request: ResolvedRequest, device: torch.device,
                     flops: RunFlops, peak_of: Callable[[str], float | None],
                     embeddings: TextEmbeddings | None = None
                     ) -> tuple[dict[str, Any], _Outputs | None, TextEmbeddings | None]:
    """One wanrt-pipeline run (T5, sampling, decode) measured phase by phase. Given
    `embeddings`, no text encoder is built and the run has no T5 phase."""
    result = _measure_pipeline(source, strategy, request, device, flops, peak_of, embeddings)
    _free_memory(device)  # the run's models are gone with its frame
    return result


def _measure_pipeline(source: ModelSource, strategy: Strategy, request: ResolvedRequest, device: torch.device,
                      flops: RunFlops, peak_of: Callable[[str], float | None], embeddings: TextEmbeddings | None
                      ) -> tuple[dict[str, Any], _Outputs | None, TextEmbeddings | None]:
    scenario, runner = source.scenario, strategy.value
    pipeline, engine = source.pipeline(strategy, device, with_text_encoder=embeddings is None)
    sampler = MemorySampler(device)
    recorder = RunRecorder(device, sampler)
    # The engine's hooks, with each expert runner timed from outside.
    pipeline.wrap_expert = lambda expert, model: recorder.timed_forward(expert.value,
                                                                      engine.wrap_expert(expert, model))
    pipeline.prepare_vae = engine.prepare_vae
    record: dict[str, Any] = {"runner": runner, "status": "ok", "note": None}
    outputs = None
    try:
        with sampler, vram_cap(device, scenario.vram_gib):
            if embeddings is None:
                with recorder.phase("t5"):
                    embeddings = pipeline.encode_text(request.prompt, request.negative_prompt)
            with recorder.phase("sampling"):
                state = pipeline.start(request)
                recorder.begin_steps()
                state = pipeline.denoise(state, embeddings, on_step=lambda info: recorder.step_finished(
                    info.index, info.timestep, info.expert.value, pipeline.streamed_bytes))
                latents = state.latents[0].float().cpu()
            with recorder.phase("decode"):
                video = pipeline.decode(latents)
        outputs = _Outputs(latents, video)
    except (WanrtError, torch.OutOfMemoryError) as error:
        record.update(status="failed", note=_one_line(error))
    matmul = _matmul_precision(runner, scenario, device)
    steps = recorder.steps(flops.dit_forward.total)
    record.update(
        setup={"strategy": runner, "precision": pipeline.precision, "matmul_precision": matmul,
               "compute_dtype": str(pipeline.dit_dtype).removeprefix("torch."), "engine": engine.describe(),
               "t5_device": str(pipeline.text_device), "clock": recorder.clock.method,
               "load_seconds": dict(pipeline.load_seconds), "quantization": dict(pipeline.quant_summaries),
               **_placement(pipeline, strategy)},
        phases=recorder.phases, steps=steps, summary=summarize(recorder.phases, steps, flops, peak_of(matmul)),
        memory=recorder.memory())
    return record, outputs, embeddings


def measure_diffusers(source: ModelSource, request: ResolvedRequest, embeddings: TextEmbeddings, noise: Tensor,
                      device: torch.device, flops: RunFlops, peak_of: Callable[[str], float | None]
                      ) -> tuple[dict[str, Any], _Outputs | None]:
    result = _measure_diffusers(source, request, embeddings, noise, device, flops, peak_of)
    _free_memory(device)
    return result


def _measure_diffusers(source: ModelSource, request: ResolvedRequest, embeddings: TextEmbeddings, noise: Tensor,
                       device: torch.device, flops: RunFlops, peak_of: Callable[[str], float | None]
                       ) -> tuple[dict[str, Any], _Outputs | None]:
    runner = Baseline.DIFFUSERS.value
    try:
        baseline = DiffusersBaseline(source, device, request.shift)
    except BaselineSkipped as skipped:
        return {"runner": runner, "status": "skipped", "note": str(skipped)}, None
    sampler = MemorySampler(device)
    recorder = RunRecorder(device, sampler)
    record: dict[str, Any] = {"runner": runner, "status": "ok", "note": None}
    outputs = None
    try:
        with sampler, vram_cap(device, source.scenario.vram_gib):
            outputs = _Outputs(*baseline.run(request, embeddings, noise, recorder))
    except torch.OutOfMemoryError as error:
        record.update(status="failed", note=_one_line(error))
    matmul = "bf16" if device.type == "cuda" else "fp32"
    steps = recorder.steps(flops.dit_forward.total)
    record.update(setup={**baseline.setup, "matmul_precision": matmul, "clock": recorder.clock.method},
                  phases=recorder.phases, steps=steps,
                  summary=summarize(recorder.phases, steps, flops, peak_of(matmul)), memory=recorder.memory())
    return record, outputs


# ---------------------------------------------------------------------- comparisons


def fidelity(run: _Outputs, reference: _Outputs) -> dict[str, Any]:
    latents, ref_latents = run.latents.double(), reference.latents.double()
    mse = (run.video.double() - reference.video.double()).pow(2).mean().item()
    return {
        "latents_rel_l2": ((latents - ref_latents).norm() / ref_latents.norm().clamp_min(1e-30)).item(),
        "latents_max_abs": (latents - ref_latents).abs().max().item(),
        # The video is in [-1, 1]: a peak-to-peak of 2. Identical videos have no finite PSNR.
        "video_psnr_db": 10 * math.log10(4 / mse) if mse > 0 else None,
        "identical": mse == 0 and bool(torch.equal(latents, ref_latents)),
    }


def ratios(wanrt: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any] | None:
    """How wanrt compares with one baseline; None unless both ran."""
    if wanrt["status"] != "ok" or baseline["status"] != "ok":
        return None
    ours, theirs = wanrt["phases"], baseline["phases"]
    result: dict[str, Any] = {}
    for phase in ("sampling", "decode"):
        result[f"{phase}_speedup"] = theirs[phase]["seconds"] / ours[phase]["seconds"]
    result["sampling_and_decode_speedup"] = (
        (theirs["sampling"]["seconds"] + theirs["decode"]["seconds"])
        / (ours["sampling"]["seconds"] + ours["decode"]["seconds"]))
    if "t5" in theirs:
        result["t5_speedup"] = theirs["t5"]["seconds"] / ours["t5"]["seconds"]
    peaks = [max(p["device_peak_bytes"] for p in phases.values()) if all(
        p["device_peak_bytes"] is not None for p in phases.values()) else None for phases in (ours, theirs)]
    result["peak_vram_ratio"] = peaks[0] / peaks[1] if None not in peaks and peaks[1] else None
    return result


# ---------------------------------------------------------------------- scenarios


def request_for(scenario: Scenario) -> ResolvedRequest:
    return GenerationRequest(prompt=scenario.prompt, size=scenario.size, frame_num=scenario.frames,
                             steps=scenario.steps, seed=scenario.seed,
                             image=conditioning_image(scenario)).resolved(scenario.spec)


def flops_for(scenario: Scenario) -> RunFlops:
    return run_flops(scenario.spec, scenario.size, scenario.frames, scenario.steps)


def run_scenario(scenario: Scenario, device: torch.device,
                 progress: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    task = scenario.spec
    request = request_for(scenario)
    source = ModelSource(scenario)
    flops = flops_for(scenario)
    peak = device_peak(device_name(device)) if device.type == "cuda" else None

    def peak_of(matmul_precision: str) -> float | None:
        return peak.for_precision(matmul_precision) if peak else None

    runs: dict[str, dict[str, Any]] = {}
    outputs: dict[str, _Outputs] = {}
    progress(f"{scenario.name}: wanrt")
    runs["wanrt"], produced, embeddings = measure_pipeline(source, Strategy.WANRT, request, device, flops, peak_of)
    if produced is not None:
        outputs["wanrt"] = produced
    for baseline in scenario.baselines:
        progress(f"{scenario.name}: {baseline.value} baseline")
        if baseline is Baseline.OFFICIAL:
            runs[baseline.value], produced, _ = measure_pipeline(source, Strategy.OFFICIAL, request, device,
                                                                 flops, peak_of)
        elif embeddings is None:
            runs[baseline.value], produced = {"runner": baseline.value, "status": "skipped",
                                              "note": "the wanrt run failed before its text embeddings"}, None
        else:
            # The noise `Pipeline.start` draws for this seed.
            noise = noise_for((task.vae.z_dim, *flops.latent_grid), scenario.seed)
            runs[baseline.value], produced = measure_diffusers(source, request, embeddings, noise, device,
                                                               flops, peak_of)
        if produced is not None:
            outputs[baseline.value] = produced
    reference = next((name for name in _REFERENCES if name in outputs), None)
    for name, produced in outputs.items():
        if name != reference:
            runs[name]["fidelity"] = {"reference": reference, **fidelity(produced, outputs[reference])}
    return {
        "name": scenario.name, "settings": scenario.settings(), "weights": scenario.weights.value,
        "request": request.settings(), "flops": flops.to_dict(), "runs": runs,
        "ratios": {b.value: ratios(runs["wanrt"], runs[b.value]) for b in scenario.baselines},
        "fidelity_reference": reference,
    }


WARM_UP = Scenario(name="warm-up", task="tiny-t2v", frames=1, steps=1, baselines=())


def warm_up(device: torch.device) -> None:
    """One unmeasured tiny run first, so that no measured run pays the process's one-time
    costs (CUDA context and library handles, first kernels, tokenizer and ftfy imports)."""
    measure_pipeline(ModelSource(WARM_UP), Strategy.WANRT, request_for(WARM_UP), device, flops_for(WARM_UP),
                     lambda precision: None)


def run_benchmarks(scenarios: tuple[Scenario, ...], device: torch.device | None = None,
                   progress: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Measure every scenario and return the report (see `wanrt.bench.report` to write it)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_runnable(scenarios, device)
    progress("warm-up: one unmeasured tiny-t2v run")
    warm_up(device)
    labels = {scenario.weights.value for scenario in scenarios}
    report = {
        "format": REPORT_FORMAT, "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_only": device.type != "cuda", "note": CPU_NOTE if device.type != "cuda" else None,
        "weights": labels.pop() if len(labels) == 1 else "mixed",
        "weights_note": RANDOM_WEIGHTS_NOTE if any(s.weights is Weights.RANDOM for s in scenarios) else None,
        "environment": environment(device), "definitions": DEFINITIONS,
        "warm_up": "one unmeasured tiny-t2v run before the scenarios (one-time process costs)",
        "scenarios": [run_scenario(scenario, device, progress) for scenario in scenarios],
    }
    return report
