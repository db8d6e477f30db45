"""The evidence suite: every GPU claim of wanrt re-measured in one process, in one call.

    python benchmarks/gpu_suite.py --out benchmarks/results             # GPU: full size, 540 s budget
    python benchmarks/gpu_suite.py --tiny --out /tmp/suite-check        # CPU: tiny shapes, checks the suite

(On the lent GPU machine, which has no package index: `python3 -m pip install -q --no-deps
--no-build-isolation --no-index -e .` first; see the README.)

On full-size random weights (timings and memory only, never quality) it measures, side by
side: the A14B block in every precision, with each SDPA kernel and through each engine
(eager, torch.compile, AOTInductor) with its error against bf16; the A14B expert forward resident and streamed
under a 24 GiB cap; T2V-A14B 480P end to end under 24 GiB and TI2V-5B 720P for a few steps
(per-step time, peaks, the full schedule extrapolated and labelled so); the VAE decode; and
diffusers' pipeline on the same weights where diffusers is importable. The features that came
later are measured through their own benchmark scripts' functions: 8-bit attention against bf16
SDPA, alone and in the block with fp8/int8 GEMMs (attention_bench); the 4-step distill sampler
with a LoRA per expert end to end under 24 GiB (fast_sampling_bench); the 720P VAE decode tiled
by the planner under 24 GiB (vae_tiling_bench).

Sections are data: `SECTIONS` lists each one with the seconds it is estimated to take on
an H100 (from the results in benchmarks/results/) and on the CPU tiny run. The wall budget
(`--budget`) is enforced before each section: one whose estimate does not fit in what is
left is skipped, and the report says so. A new feature is measured by one more `Section`
whose `run(suite)` returns its `Row`s and a details dict, e.g. a run with another engine:

    Section("e2e-t2v-a14b-480p-compile", "the same run through torch.compile", 200, 4,
            end_to_end(lambda suite: dataclasses.replace(t2v_scenario(suite), engine="compile")))

Each section's real duration is recorded beside its estimate, so the estimates can be
corrected from the last run.

Writes `report.json`, `report.md` and PNG plots (with matplotlib) into
`<out>/<device>-<date>/`, atomically, and prints a short table last. Timings: warm-up
first, CUDA events (perf_counter on a CPU), medians; every timed output is checked to be
finite and non-zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, Callable

# The budget counts from here: importing torch and wanrt is part of what a call spends.
PROCESS_START = time.perf_counter()

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from wanrt.bench.flops import device_peak  # noqa: E402
from wanrt.bench.harness import (RANDOM_WEIGHTS_NOTE, WARM_UP, _free_memory, _one_line, _version,  # noqa: E402
                                 device_name, environment, fidelity, flops_for, measure_diffusers, measure_pipeline,
                                 request_for, vram_cap)
from wanrt.bench.measure import Clock, steady_step_seconds  # noqa: E402
from wanrt.bench.models import ModelSource, Strategy, random_dit, random_vae  # noqa: E402
from wanrt.bench.report import _bytes, _environment_lines, _num, _table, json_text, run_folder  # noqa: E402
from wanrt.bench.report import device_slug, write_folder_atomically  # noqa: E402
from wanrt.bench.scenarios import Scenario  # noqa: E402
from wanrt.configs import TaskSpec, get_task  # noqa: E402
from wanrt.pipelines import Pipeline, TextEmbeddings, noise_for  # noqa: E402
from wanrt.runtime.planner import token_grid  # noqa: E402

REPORT_FORMAT = "wanrt-gpu-suite/1"
DEFAULT_BUDGET_S = 540.0
# The default hard stop is this long after the budget: time for the section in flight to
# overrun a little and for the report to be written, inside a 600 s call.
HARD_STOP_MARGIN_S = 30.0
NOT_SELECTED = "not selected (--sections)"
DTYPE = torch.bfloat16
TINY_NOTE = "CPU tiny shapes: checks that the suite runs; no performance claim"
DEFINITIONS = {
    "seconds": "median of the timed runs after warm-up (CUDA events on a GPU, perf_counter on a CPU)",
    "rel_l2_vs_bf16": "||out - out_bf16|| / ||out_bf16|| on the same inputs and weights",
    "max_abs_rel_vs_eager": "max |out - out_eager| / max |out_eager| (engine_bench's measure)",
    "peak_vram": "torch.cuda.max_memory_allocated over the timed runs (the whole phase for end-to-end runs)",
    "extrapolated": "not measured: each expert's first step as measured (its placement on the device, the "
                    "expert swap) plus every other step of the task's default schedule at the median steady "
                    "step; a row that is extrapolated says so in its case",
    "first step": "an expert's first step holds its placement on the device (for the first expert also the "
                  "block streamer's set-up: the streamed blocks of every expert copied to pinned host memory; "
                  "for the next, the expert swap)",
    "end to end": "sampling (first latents to the last step, streaming and expert swaps included) and the VAE "
                  "decode to host frames; fixed random text embeddings stand in for T5, which is not run",
}


class Status(str, Enum):
    OK = "ok"
    SKIPPED = "skipped"
    FAILED = "failed"


class SectionSkipped(Exception):
    """The section cannot run here (a missing optional package); the message says why."""


class DegenerateOutput(AssertionError):
    """A timed output was not finite or all zeros: its time would mean nothing."""


def require_signal(output: Tensor, what: str) -> None:
    values = output.detach().float()
    if not bool(torch.isfinite(values).all()):
        raise DegenerateOutput(f"{what}: the output holds NaN/Inf")
    if values.numel() == 0 or float(values.abs().max()) == 0.0:
        raise DegenerateOutput(f"{what}: the output is all zeros")


# ---------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    """The shapes a run measures: full size on a GPU, tiny stand-ins on the CPU."""

    moe_task: str                   # the A14B sections
    ti2v_task: str
    sizes: tuple[tuple[str, str], ...]  # (label, size) of moe_task: 480P, 720P
    ti2v_size: str
    frames: int | None              # of every section's videos; None: the task's default
    vram_gib: float                 # the cap of the streamed and end-to-end A14B runs
    steps: int                      # measured steps of each end-to-end run
    block_warmup: int
    block_iters: int
    expert_iters: int
    decode_iters: int
    tiled_decode: tuple[str, float]  # (size, VRAM cap GiB) of the A14B VAE decode through the planner's tiling

    def size(self, label: str) -> str:
        return dict(self.sizes)[label]


# 4 steps of the shift-12 schedule are 999, 972, 922 (high-noise expert) and 799 (low-noise):
# a short run that still swaps experts once, as a 40-step run does.
FULL = Workload(moe_task="t2v-A14B", ti2v_task="ti2v-5B", sizes=(("480P", "832*480"), ("720P", "1280*720")),
                ti2v_size="1280*704", frames=None, vram_gib=24.0, steps=4, block_warmup=3, block_iters=10,
                expert_iters=3, decode_iters=1, tiled_decode=("1280*720", 24.0))
# Stand-ins at the tiny tasks' sizes, one frame: what runs is the same code, in seconds.
TINY = Workload(moe_task="tiny-t2v", ti2v_task="tiny-ti2v", sizes=(("480P", "64*64"), ("720P", "96*64")),
                ti2v_size="128*64", frames=1, vram_gib=24.0, steps=4, block_warmup=1, block_iters=2,
                expert_iters=2, decode_iters=1, tiled_decode=("128*128", 2.1))  # 2.1 GiB: the planner picks 2 tiles


# ---------------------------------------------------------------------- rows and the suite


@dataclass
class Row:
    """One measured (or, flagged, extrapolated) figure of a section."""

    case: str                        # what ran: "480P fp8 eager"
    per: str                         # what one time is of: "block forward", "step", "decode"
    seconds: float
    runs: int                        # timed runs the median is over (0: extrapolated)
    error: float | None = None
    error_metric: str | None = None  # a key of DEFINITIONS
    peak_vram_bytes: int | None = None
    extrapolated: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Section:
    name: str
    measures: str              # one line for the report
    estimate_s: float          # full size on an H100
    tiny_estimate_s: float     # tiny shapes on a CPU
    run: Callable[["Suite"], tuple[list[Row], dict[str, Any]]]  # rows and details


class Suite:
    """What every section gets: the device, the workload, the clock and the budget."""

    def __init__(self, device: torch.device, workload: Workload, budget_s: float,
                 started: float | None = None) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.workload = workload
        self.budget_s = budget_s
        self.started = time.perf_counter() if started is None else started
        self.clock = Clock(device)
        self.peak = device_peak(device_name(device)) if self.cuda else None
        # What one section leaves for a later one (the end-to-end outputs the diffusers run
        # is compared with).
        self.shared: dict[str, Any] = {}

    @property
    def moe(self) -> TaskSpec:
        return get_task(self.workload.moe_task)

    def left_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def peak_of(self, matmul_precision: str) -> float | None:
        return self.peak.for_precision(matmul_precision) if self.peak else None

    @property
    def frame_num(self) -> int:
        return self.workload.frames or self.moe.sample.frame_num

    def grid(self, label: str) -> tuple[int, int, int]:
        return token_grid(self.moe, self.workload.size(label), self.frame_num)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_vram(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None

    def timed(self, fn: Callable[[], Tensor], what: str, warmup: int, iters: int) -> tuple[dict[str, Any], Tensor]:
        """Median seconds of `iters` calls after `warmup` calls, and the last output (checked)."""
        for _ in range(warmup):
            fn()
        self.reset_peak()
        times, output = [], None
        for _ in range(iters):
            start = self.clock.mark()
            output = fn()
            times.append(self.clock.seconds(start, self.clock.mark()))
        require_signal(output, what)
        return {"seconds": statistics.median(times), "runs": iters, "peak_vram_bytes": self.peak_vram(),
                "seconds_all": times}, output


# ---------------------------------------------------------------------- sections: blocks and engines


def _rms_checked(value: float, what: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise DegenerateOutput(f"{what}: output RMS {value} (NaN, infinite or zero)")


def weight_only_available() -> bool:
    """The weight-only schemes run through optimum-quanto, which the GPU image lacks."""
    try:
        import optimum.quanto  # noqa: F401
    except ImportError:
        return False
    return True


def blocks(suite: Suite) -> tuple[list[Row], dict[str, Any]]:
    """quant_bench's block measurement, for every quantization scheme wanrt has."""
    from quant_bench import SCHEMES as W8A8_SCHEMES
    from quant_bench import bench_block

    from wanrt.export.quantize import Scheme

    schemes = tuple(Scheme) if weight_only_available() else W8A8_SCHEMES
    rows, results = [], []
    for label, _ in suite.workload.sizes:
        for result in bench_block(suite.moe.dit, suite.grid(label), suite.device, suite.workload.block_warmup,
                                  suite.workload.block_iters, schemes):
            _rms_checked(result["output_rms"], f"{label} {result['scheme']} block")
            results.append({"size": label, **result})
            rows.append(Row(f"{label} {result['scheme']} eager", "block forward", result["seconds_median"],
                            result["iters"], result["rel_l2_vs_bf16"], "rel_l2_vs_bf16",
                            extra={"achieved_tflops": result["achieved_tflops"], "kernels": result["kernels"],
                                   "weight_bytes": result["weight_bytes"]}))
    skipped = [scheme.value for scheme in Scheme if scheme not in schemes]
    return rows, {"attention": "torch.nn.functional.scaled_dot_product_attention (8-bit attention: the "
                               "attention-8bit sections)",
                  "schemes_skipped": f"{', '.join(skipped)}: optimum-quanto is not importable" if skipped else None,
                  "results": results}


def attention_backends(suite: Suite) -> tuple[list[Row], dict[str, Any]]:
    """The bf16 block with each of torch's SDPA kernels forced, against the default dispatch
    (the kernel a plain run gets). The math kernel materialises the whole attention matrix
    (hundreds of GB at 720P): CPU only."""
    from dit_block_bench import random_block
    from engine_bench import block_inputs
    from torch.nn.attention import SDPBackend, sdpa_kernel

    config, device, workload = suite.moe.dit, suite.device, suite.workload
    backends = ((SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION)
                if suite.cuda else (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION))
    block = random_block(config, device, DTYPE)
    rows, unavailable = [], {}
    for label, _ in workload.sizes:
        inputs = block_inputs(config, suite.grid(label), device, DTYPE)

        def forward() -> Tensor:
            with torch.no_grad(), torch.autocast(device.type, dtype=DTYPE):
                return block(*inputs)

        timing, reference = suite.timed(forward, f"{label} block", workload.block_warmup, workload.block_iters)
        rows.append(Row(f"{label} default dispatch", "block forward", timing["seconds"], timing["runs"], 0.0,
                        "rel_l2_vs_bf16", timing["peak_vram_bytes"]))
        for backend in backends:
            name = backend.name.lower()
            try:
                with sdpa_kernel([backend]):
                    timing, output = suite.timed(forward, f"{label} {name} block", workload.block_warmup,
                                                 workload.block_iters)
            except RuntimeError as error:  # the kernel cannot run these inputs on this device
                unavailable[f"{label} {name}"] = _one_line(error)
                continue
            rows.append(Row(f"{label} {name}", "block forward", timing["seconds"], timing["runs"],
                            _rel_l2(output, reference), "rel_l2_vs_bf16", timing["peak_vram_bytes"]))
    return rows, {"backends": [backend.name for backend in backends], "unavailable": unavailable,
                  "reference": "the same bf16 block under torch's default SDPA dispatch"}


def engines(precision: str, label: str) -> Callable[[Suite], tuple[list[Row], dict[str, Any]]]:
    """engine_bench's eager / torch.compile / AOTInductor comparison of one block."""

    def run(suite: Suite) -> tuple[list[Row], dict[str, Any]]:
        from engine_bench import bench_precision

        sizes = {label: (suite.workload.size(label), suite.frame_num)}
        try:
            results = bench_precision(suite.moe, precision, sizes, suite.device, suite.workload.block_iters,
                                      dynamic=False)
        finally:
            torch._dynamo.reset()
        rows = []
        for result in results:
            _rms_checked(result["eager_output_rms"], f"{label} {precision} eager block")
            errors = result["max_abs_error_relative_to_eager"]
            for engine, seconds in result["block_seconds_median"].items():
                build = {key: value for key, value in result["build_seconds"].items() if key.startswith(engine)}
                rows.append(Row(f"{label} {precision} {engine}", "block forward", seconds, suite.workload.block_iters,
                                errors.get(engine, 0.0), "max_abs_rel_vs_eager",
                                extra={"build_seconds": build, "speedup_vs_eager":
                                       result["speedup_vs_eager"].get(engine, 1.0)}))
        return rows, {"results": results}

    return run


def eight_bit_attention(label: str) -> Callable[[Suite], tuple[list[Row], dict[str, Any]]]:
    """attention_bench's measurement at `label`'s token count: one A14B self-attention
    through bf16 SDPA and wanrt's 8-bit Triton kernel (fp8 P·V on SM89+, fp16 otherwise;
    third-party 8-bit kernels where installed), then the whole block with 8-bit attention,
    alone and with fp8/int8 GEMMs; each against bf16 SDPA."""

    def run(suite: Suite) -> tuple[list[Row], dict[str, Any]]:
        from attention_bench import bench_attention
        from attention_bench import bench_block as bench_attention_block

        config, device, workload = suite.moe.dit, suite.device, suite.workload
        grid = suite.grid(label)
        attention_results = bench_attention(config, math.prod(grid), device, workload.block_warmup,
                                            workload.block_iters)
        block_results = bench_attention_block(config, grid, device, workload.block_warmup, workload.block_iters)
        rows = []
        for result in attention_results:
            if "error" in result:  # a third-party kernel that cannot run here: in the details
                continue
            _rms_checked(result["output_rms"], f"{label} {result['kernel']} attention")
            rows.append(Row(f"{label} attention {result['kernel']}", "self-attention", result["seconds_median"],
                            result["iters"], result["rel_l2_vs_bf16"], "rel_l2_vs_bf16",
                            extra={"speedup_vs_bf16_sdpa": result["speedup_vs_bf16_sdpa"],
                                   "achieved_tflops": result["achieved_tflops"]}))
        for result in block_results:
            _rms_checked(result["output_rms"], f"{label} {result['linears']} {result['attention']} block")
            rows.append(Row(f"{label} block {result['linears']} linears, {result['attention']}", "block forward",
                            result["seconds_median"], result["iters"], result["rel_l2_vs_bf16"], "rel_l2_vs_bf16",
                            extra={"speedup_vs_bf16_sdpa": result["speedup_vs_bf16_sdpa"],
                                   "achieved_tflops": result["achieved_tflops"],
                                   "linear_kernels": result["linear_kernels"]}))
        return rows, {"grid_fhw": list(grid), "reference": "bf16 SDPA on the same inputs (and block weights)",
                      "unavailable": {r["kernel"]: r["error"] for r in attention_results if "error" in r},
                      "attention_results": attention_results, "block_results": block_results}

    return run


# ---------------------------------------------------------------------- sections: the expert forward


def expert(label: str, precisions: tuple[str, ...], streamed: bool, iters: int | None = None
           ) -> Callable[[Suite], tuple[list[Row], dict[str, Any]]]:
    """The whole A14B expert at `label`'s token count: bf16 resident (the reference), bf16
    with every block streamed through the block streamer under the VRAM cap, and each
    other precision resident. One model at a time is on the device."""

    def run(suite: Suite) -> tuple[list[Row], dict[str, Any]]:
        from stream_bench import inputs_for

        from wanrt.export.quantize import quantize
        from wanrt.runtime.streaming import BlockStreamer

        config, device, workload = suite.moe.dit, suite.device, suite.workload
        runs = iters or workload.expert_iters
        x, t, context = inputs_for(config, suite.grid(label), device)

        def forward(model) -> Tensor:
            with torch.no_grad(), torch.autocast(device.type, dtype=DTYPE):
                return model(x, t, context)

        model = random_dit(config, 0, device, DTYPE)
        timing, reference = suite.timed(lambda: forward(model), f"{label} bf16 expert", 1, runs)
        resident_seconds = timing["seconds"]
        rows = [Row(f"{label} bf16 resident", "expert forward", timing["seconds"], runs, 0.0, "rel_l2_vs_bf16",
                    timing["peak_vram_bytes"])]
        details: dict[str, Any] = {"grid_fhw": list(suite.grid(label)), "bf16_resident": timing}
        if streamed:
            streamer = BlockStreamer(device, depth=2)
            streamer.register("expert", model)  # every block to (pinned) host memory

            def streamed_forward() -> Tensor:
                streamer.expect_forward("expert")
                return forward(model)

            with vram_cap(device, workload.vram_gib):
                copied = streamer.bytes_copied
                timing, output = suite.timed(streamed_forward, f"{label} streamed expert", 1, runs)
            per_forward = (streamer.bytes_copied - copied) / (runs + 1)
            rows.append(Row(f"{label} bf16 streamed ({workload.vram_gib:g} GiB cap)", "expert forward",
                            timing["seconds"], runs, _rel_l2(output, reference), "rel_l2_vs_bf16",
                            timing["peak_vram_bytes"],
                            extra={"overhead_vs_resident": timing["seconds"] / resident_seconds - 1,
                                   "streamed_bytes_per_forward": per_forward,
                                   "h2d_gb_per_s": per_forward / timing["seconds"] / 1e9,
                                   "pinned_bytes": streamer.pinned_bytes}))
            details["bf16_streamed"] = timing
            streamer.release()
            del streamer
        del model
        _free_memory(device)
        for precision in precisions:
            model = quantize(random_dit(config, 0, device, DTYPE), precision)
            timing, output = suite.timed(lambda: forward(model), f"{label} {precision} expert", 1, runs)
            rows.append(Row(f"{label} {precision} resident", "expert forward", timing["seconds"], runs,
                            _rel_l2(output, reference), "rel_l2_vs_bf16", timing["peak_vram_bytes"],
                            extra={"quantization": model.quant_report.summary()}))
            details[f"{precision}_resident"] = timing
            del model
            _free_memory(device)
        return rows, details

    return run


def _rel_l2(output: Tensor, reference: Tensor) -> float:
    diff = output.float() - reference.float()
    return float(diff.norm() / reference.float().norm())


# ---------------------------------------------------------------------- sections: end to end


def random_embeddings(task: TaskSpec, seed: int = 0) -> TextEmbeddings:
    """Fixed text embeddings of a prompt's and a negative prompt's lengths (T5 is not run)."""
    generator = torch.Generator().manual_seed(seed)
    return TextEmbeddings(torch.randn(12, task.dit.text_dim, generator=generator),
                          torch.randn(15, task.dit.text_dim, generator=generator))


def first_steps(steps: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each expert's first step, by expert."""
    firsts: dict[str, dict[str, Any]] = {}
    for step in steps:
        firsts.setdefault(step["expert"], step)
    return firsts


def extrapolated_sampling(steps: list[dict[str, Any]], total_steps: int) -> float | None:
    """See DEFINITIONS['extrapolated']; None without a steady step to go on."""
    steady = steady_step_seconds(steps)
    if steady is None:
        return None
    firsts = first_steps(steps)
    return sum(step["seconds"] for step in firsts.values()) + (total_steps - len(firsts)) * steady


def run_rows(record: dict[str, Any], scenario: Scenario) -> list[Row]:
    """The rows of one end-to-end record of the harness (a wanrt or a diffusers run)."""
    phases, steps, summary = record["phases"], record["steps"], record["summary"]
    sampling, decode = phases["sampling"], phases["decode"]
    host = {"host_peak_bytes": sampling["host_peak_bytes"]}
    rows = [Row(f"sampling, {len(steps)} steps", "run", sampling["seconds"], 1, None, None,
                sampling["device_peak_bytes"], extra={**host, "streamed_bytes": summary["streamed_bytes"],
                                                      "h2d_gb_per_s": summary["h2d_gb_per_s"]})]
    firsts = first_steps(steps)
    rows += [Row(f"first step of the {name} expert (places it)", "step", step["seconds"], 1)
             for name, step in firsts.items()]
    steady = summary["steady_step_seconds"]
    if steady is not None:
        rows.append(Row("steady step (median)", "step", steady, len(steps) - len(firsts),
                        extra={"dit_achieved_tflops": summary["achieved_tflops"]["dit"]}))
    rows.append(Row("VAE decode", "decode", decode["seconds"], 1, None, None, decode["device_peak_bytes"],
                    extra={"host_peak_bytes": decode["host_peak_bytes"]}))
    total_steps = scenario.spec.sample.steps
    extrapolated = extrapolated_sampling(steps, total_steps)
    if extrapolated is not None:
        rows.append(Row(f"{total_steps}-step sampling (extrapolated)", "run", extrapolated, 0, extrapolated=True))
        rows.append(Row(f"{total_steps}-step sampling + decode (extrapolated)", "run",
                        extrapolated + decode["seconds"], 0, extrapolated=True))
    return rows


def _scenario(suite: Suite, task: str, size: str, vram_gib: float | None) -> Scenario:
    name = f"{task}-{size.replace('*', 'x')}" + (f"-{vram_gib:g}GiB" if vram_gib else "")
    return Scenario(name=name, task=task, size=size, frames=suite.workload.frames, steps=suite.workload.steps,
                    vram_gib=vram_gib, baselines=())


def t2v_scenario(suite: Suite) -> Scenario:
    return _scenario(suite, suite.workload.moe_task, suite.workload.size("480P"), suite.workload.vram_gib)


def ti2v_scenario(suite: Suite) -> Scenario:
    return _scenario(suite, suite.workload.ti2v_task, suite.workload.ti2v_size, None)


def end_to_end(scenario_of: Callable[[Suite], Scenario]) -> Callable[[Suite], tuple[list[Row], dict[str, Any]]]:
    """A wanrt pipeline run as `wanrt generate` makes it (planned within the scenario's cap),
    measured by the bench harness."""

    def run(suite: Suite) -> tuple[list[Row], dict[str, Any]]:
        scenario = scenario_of(suite)
        request, flops = request_for(scenario), flops_for(scenario)
        record, outputs, _ = measure_pipeline(ModelSource(scenario), Strategy.WANRT, request, suite.device, flops,
                                              suite.peak_of, embeddings=random_embeddings(scenario.spec))
        if record["status"] != Status.OK.value:
            raise RuntimeError(record["note"])
        require_signal(outputs.video, f"{scenario.name} video")
        suite.shared[scenario.name] = outputs
        return run_rows(record, scenario), {"scenario": scenario.settings(), "flops": flops.to_dict(),
                                            "run": record}

    return run


def distill_lora_t2v(suite: Suite) -> tuple[list[Row], dict[str, Any]]:
    """fast_sampling_bench's end-to-end run: T2V-A14B 480P, the 4-step distill sampler and
    a random rank-64 LoRA per expert merged at load, planned and streamed under the cap."""
    from fast_sampling_bench import DEFAULT_RAM_GIB, e2e_distill_lora

    workload = suite.workload
    with tempfile.TemporaryDirectory() as folder:  # the LoRA files; the cap is set around the run inside
        result = e2e_distill_lora(Path(folder), workload.moe_task, workload.size("480P"), workload.frames,
                                  suite.device, workload.vram_gib, DEFAULT_RAM_GIB)
    if not result["video_finite"]:
        raise DegenerateOutput("distill LoRA video: NaN/Inf")
    steps = result["step_seconds"]
    peaks = {"sampling_peak_vram_bytes": result["sampling_peak_vram_bytes"]}
    rows = [Row(f"step {index} ({expert})", "step", seconds, 1)
            for index, (seconds, expert) in enumerate(zip(steps, result["step_experts"]))]
    rows += [Row(f"sampling, {len(steps)} steps", "run", result["sampling_seconds"], 1, None, None,
                 result["sampling_peak_vram_bytes"], extra={"dit_forwards": result["dit_forwards"]}),
             Row("VAE decode", "decode", result["decode_seconds"], 1),
             Row(f"{len(steps)} steps + decode (one-time pinning excluded)", "run", result["e2e_seconds"], 1, None,
                 None, result["peak_vram_bytes"], extra={**peaks, "dit_forwards": result["dit_forwards"]}),
             Row("one-time: planning and pinning (a 1-step run)", "run", result["first_use_seconds"], 1),
             Row("one-time: LoRA merge at load", "load", result["lora_merge_seconds"], 1)]
    return rows, {"excluded": "the one-time work (LoRA merge at load, the first use's planning and pinning of the "
                              "streamed blocks) is timed apart, not in the end-to-end row", "result": result}


def diffusers_t2v(suite: Suite) -> tuple[list[Row], dict[str, Any]]:
    """diffusers' WanPipeline on the same weights, embeddings and noise as the wanrt t2v run."""
    scenario = t2v_scenario(suite)
    request, flops = request_for(scenario), flops_for(scenario)
    noise = noise_for((scenario.spec.vae.z_dim, *flops.latent_grid), scenario.seed)  # what `Pipeline.start` draws
    record, outputs = measure_diffusers(ModelSource(scenario), request, random_embeddings(scenario.spec), noise,
                                        suite.device, flops, suite.peak_of)
    if record["status"] == Status.SKIPPED.value:
        raise SectionSkipped(record["note"])
    if record["status"] != Status.OK.value:
        raise RuntimeError(record["note"])
    require_signal(outputs.video, "diffusers video")
    details: dict[str, Any] = {"scenario": scenario.settings(), "run": record}
    wanrt = suite.shared.get(scenario.name)
    if wanrt is not None:
        details["fidelity_vs_wanrt"] = fidelity(outputs, wanrt)
    return run_rows(record, scenario), details


# ---------------------------------------------------------------------- sections: VAE decode


def vae_decode(suite: Suite) -> tuple[list[Row], dict[str, Any]]:
    """`Pipeline.decode` (the causal steps, frames to the host as they come) of the A14B
    VAE at each size, after a one-latent-frame warm-up at that size."""
    task = suite.moe
    pipeline = Pipeline.from_models(task, {}, vae=random_vae(task, 10, suite.device), device=suite.device)
    rows, details = [], {}
    generator = torch.Generator().manual_seed(3)
    for label, _ in suite.workload.sizes:
        frames, height, width = suite.grid(label)
        _, patch_h, patch_w = task.dit.patch_size
        latents = torch.randn(task.vae.z_dim, frames, height * patch_h, width * patch_w, generator=generator)
        pipeline.decode(latents[:, :1])
        timing, video = suite.timed(lambda: pipeline.decode(latents), f"{label} VAE decode", 0,
                                    suite.workload.decode_iters)
        rows.append(Row(f"{label} Wan{task.vae.version.value} VAE decode, {suite.frame_num} frames", "decode",
                        timing["seconds"], timing["runs"], None, None, timing["peak_vram_bytes"],
                        extra={"video_shape": list(video.shape)}))
        details[label] = timing
    return rows, {"tiling": "none: the whole frame per causal step, uncapped (the planner's tiling under a cap: "
                            "vae-decode-tiled-720p)", **details}


def tiled_vae_decode(suite: Suite) -> tuple[list[Row], dict[str, Any]]:
    """vae_tiling_bench's full-size decode: the A14B VAE (Wan2.1) at 720P, tiled as the
    planner picks for the cap and run under it."""
    from vae_tiling_bench import capped_tiled_decode

    task, (size, cap_gib) = suite.moe, suite.workload.tiled_decode
    width, height = (int(side) for side in size.split("*"))
    result = capped_tiled_decode(task.vae, width, height, suite.frame_num, cap_gib, suite.device)
    if not (result["output_finite"] and result["output_abs_max"] > 0):
        raise DegenerateOutput("tiled VAE decode: the output is not finite or all zeros")
    return [Row(f"{size} Wan{task.vae.version.value} VAE decode, {suite.frame_num} frames, {result['tiles']} tiles "
                f"({cap_gib:g} GiB cap)", "decode", result["seconds"], 1, None, None,
                result["peak_allocated_bytes"], extra={"predicted_peak_bytes": result["predicted_peak_bytes"],
                                                       "video_shape": result["output_shape"]})], result


# ---------------------------------------------------------------------- the registry


# In priority order: when the budget runs short, the last ones are skipped. Estimates are
# seconds on an H100 from benchmarks/results/*_h100.json (building random weights included),
# and on this project's CPU machines for the tiny shapes.
# The 8-bit attention, distill-LoRA and tiled-decode estimates are not measured yet: they are
# counted from the FLOPs (SDPA at ~400 TFLOP/s), Triton's first compiles and the e2e-t2v run.
# The headline claims (8-bit attention >= 2x SDPA, 8-bit block >= 1.6x bf16, the 4-step 480P
# run <= 30 s) come right after the runs they are compared with.
SECTIONS: tuple[Section, ...] = (
    Section("blocks", "A14B block forward at 480P and 720P, eager: bf16 SDPA against every quantization scheme "
            "(fp8/int8 W8A8 GEMMs, weight-only int8/int4), rel L2 error vs bf16", 50, 4, blocks),
    Section("attention-8bit-480p", "A14B self-attention and block at 480P: bf16 SDPA vs 8-bit attention (int8 "
            "QK^T, fp8 P·V on SM89+, fp16 otherwise), the block also with fp8/int8 GEMMs: speedup and rel L2 vs "
            "bf16 SDPA", 60, 4, eight_bit_attention("480P")),
    Section("attention-a14b", "A14B bf16 block at 480P and 720P with each SDPA kernel forced (flash, memory-"
            "efficient, cuDNN) against the default dispatch: time and rel L2 error", 30, 3, attention_backends),
    Section("e2e-t2v-a14b-480p", "T2V-A14B 480P 81 frames end to end under a 24 GiB cap, planned and streamed: "
            "per-step times, peaks, the 40-step run extrapolated", 150, 4, end_to_end(t2v_scenario)),
    Section("e2e-distill-lora-t2v-a14b-480p", "T2V-A14B 480P 81 frames, 4-step distill sampler with a random "
            "rank-64 LoRA per expert merged at load, under a 24 GiB cap: per-step times, total (one-time pinning "
            "apart), peaks, DiT forwards", 150, 3, distill_lora_t2v),
    Section("expert-a14b-480p", "A14B expert forward (40 blocks) at 480P: bf16 resident vs streamed under 24 GiB, "
            "fp8 and int8 resident, rel L2 error vs bf16", 110, 3, expert("480P", ("fp8", "int8"), streamed=True)),
    Section("engines-bf16-480p", "A14B block at 480P, bf16: eager vs torch.compile vs AOTInductor package, "
            "build times, error vs eager", 90, 100, engines("bf16", "480P")),
    Section("e2e-ti2v-5b-720p", "TI2V-5B 720P 121 frames end to end (whole model resident): per-step times, "
            "peaks, the 50-step run extrapolated", 90, 4, end_to_end(ti2v_scenario)),
    Section("vae-decode", "A14B VAE (Wan2.1) decode of 81 frames at 480P and 720P as `wanrt generate` decodes: "
            "time and peak", 70, 3, vae_decode),
    Section("vae-decode-tiled-720p", "A14B VAE (Wan2.1) decode of 81 frames at 720P under a 24 GiB cap, tiled as "
            "the planner picks: time, peak and the planner's predicted peak", 60, 3, tiled_vae_decode),
    Section("attention-8bit-720p", "the attention-8bit-480p measurement at 720P", 75, 4, eight_bit_attention("720P")),
    Section("engines-fp8-480p", "A14B block at 480P, fp8 W8A8: eager vs torch.compile vs AOTInductor package",
            90, 100, engines("fp8", "480P")),
    Section("expert-a14b-720p", "A14B expert forward at 720P: bf16 resident vs streamed under 24 GiB",
            90, 3, expert("720P", (), streamed=True, iters=2)),
    Section("diffusers-t2v-a14b-480p", "diffusers WanPipeline on the same weights, embeddings and noise as "
            "e2e-t2v-a14b-480p, under the same cap with its group offload", 200, 10, diffusers_t2v),
)
SECTION_NAMES = tuple(section.name for section in SECTIONS)


def section_record(section: Section, estimate_s: float, status: Status, note: str | None = None) -> dict[str, Any]:
    return {"name": section.name, "measures": section.measures, "estimate_s": estimate_s, "status": status.value,
            "note": note, "seconds": None, "rows": [], "details": {}}


def run_section(section: Section, suite: Suite, estimate_s: float) -> dict[str, Any]:
    left = suite.left_s()
    if estimate_s > left:
        return section_record(section, estimate_s, Status.SKIPPED, f"did not fit: estimated {estimate_s:g} s, "
                              f"{max(left, 0):.0f} s of the {suite.budget_s:g} s budget left")
    record = section_record(section, estimate_s, Status.OK)
    start = time.perf_counter()
    try:
        rows, details = section.run(suite)
        record.update(rows=[dataclasses.asdict(row) for row in rows], details=details)
    except SectionSkipped as skipped:
        record.update(status=Status.SKIPPED.value, note=str(skipped))
    except Exception as error:  # one section's failure is reported; the suite goes on
        record.update(status=Status.FAILED.value, note=_one_line(error))
    finally:
        _free_memory(suite.device)
    record["seconds"] = time.perf_counter() - start
    return record


def check_report(report: dict[str, Any]) -> None:
    """What a report promises: positive finite times, finite errors, a reason for every
    section that did not run. Raises AssertionError."""
    assert not report.get("non_finite"), f"NaN/infinite values (written as null) at {report['non_finite']}"
    for section in report["sections"]:
        if section["status"] != Status.OK.value:
            assert section["note"], f"{section['name']}: {section['status']} without a note"
            continue
        assert section["rows"], f"{section['name']}: no rows"
        for row in section["rows"]:
            where = f"{section['name']} / {row['case']}"
            assert math.isfinite(row["seconds"]) and row["seconds"] > 0, f"{where}: seconds {row['seconds']}"
            assert row["extrapolated"] == (row["runs"] == 0), f"{where}: extrapolated rows have no runs"
            if row["error"] is not None:
                assert math.isfinite(row["error"]) and row["error"] >= 0, f"{where}: error {row['error']}"
                assert row["error_metric"] in DEFINITIONS, f"{where}: undefined error metric"


# ---------------------------------------------------------------------- the report


def settings(device: torch.device) -> dict[str, Any]:
    """The switches that change the numbers."""
    cudnn_sdp = getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: None)
    return {"float32_matmul_precision": torch.get_float32_matmul_precision(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "sdpa_backends": {"flash": torch.backends.cuda.flash_sdp_enabled(),
                              "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                              "math": torch.backends.cuda.math_sdp_enabled(), "cudnn": cudnn_sdp()},
            "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
            "compute_dtype": str(DTYPE).removeprefix("torch."), "device": str(device)}


def folder_name(device: torch.device, now: datetime) -> str:
    return f"{device_slug(device_name(device))}-{now:%Y%m%d-%H%M%S}"


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# wanrt GPU suite: {report['environment']['device']['name']}", ""]
    for note in (report["note"], report["weights_note"], report["stopped"]):
        if note:
            lines += [f"> **{note}**", ""]
    lines += _environment_lines(report)
    lines += ["Settings: " + "; ".join(f"{key} {value}" for key, value in report["settings"].items()), ""]
    lines += [f"Budget {report['budget_s']:g} s, used {report['elapsed_s']:.0f} s. "
              f"Plots: {report['plots']['note']}.", ""]
    lines += _table(["section", "status", "estimate s", "took s", "note"],
                    [[s["name"], s["status"], f"{s['estimate_s']:g}", _num(s["seconds"]), s["note"] or ""]
                     for s in report["sections"]])
    lines += ["Definitions:", "", *(f"- {key}: {text}" for key, text in report["definitions"].items()), ""]
    for section in report["sections"]:
        if section["status"] != Status.OK.value:
            continue
        lines += [f"## {section['name']}", "", section["measures"], ""]
        lines += _table(["case", "per", "seconds", "runs", "error", "peak VRAM", "more"],
                        [[row["case"], row["per"], _num(row["seconds"], 4), str(row["runs"]),
                          "–" if row["error"] is None else f"{_num(row['error'])} ({row['error_metric']})",
                          _bytes(row["peak_vram_bytes"]), _extra_text(row["extra"])] for row in section["rows"]])
    return "\n".join(lines)


def _extra_text(extra: dict[str, Any]) -> str:
    parts = []
    for key, value in extra.items():
        if isinstance(value, float):
            parts.append(f"{key} {_num(value)}")
        elif isinstance(value, int) and key.endswith("bytes"):
            parts.append(f"{key.removesuffix('_bytes')} {_bytes(value)}")
        elif value not in (None, {}, ""):
            parts.append(f"{key} {value}")
    return "; ".join(parts)


def write_plots(report: dict[str, Any], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    suffix = f" ({TINY_NOTE})" if report["tiny"] else ""
    measured = [s for s in report["sections"] if s["status"] == Status.OK.value]
    heights = [len(s["rows"]) + 2 for s in measured] or [1]
    fig, axes = plt.subplots(len(heights), 1, figsize=(11, 0.3 * sum(heights) + 0.8), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    fig.suptitle("Median seconds per case (hatched: extrapolated)" + suffix)
    for ax, section in zip(axes[:, 0], measured):
        rows = section["rows"]
        ax.barh(range(len(rows)), [row["seconds"] for row in rows],
                hatch=["//" if row["extrapolated"] else "" for row in rows])
        ax.set_yticks(range(len(rows)), [f"{row['case']} [{row['per']}]" for row in rows], fontsize="small")
        ax.invert_yaxis()
        ax.set(title=section["name"], xlabel="seconds")
    fig.tight_layout()
    fig.savefig(folder / "sections.png", dpi=90)
    plt.close(fig)

    runs = [(s["name"], s["details"]["run"]) for s in measured if "run" in s["details"]]
    fig, axes = plt.subplots(max(1, len(runs)), 1, figsize=(10, 3.2 * max(1, len(runs))), squeeze=False)
    fig.suptitle("End-to-end runs: seconds per step (DiT forwards, and the rest)" + suffix)
    for ax, (name, run) in zip(axes[:, 0], runs):
        steps = run["steps"]
        forwards = [step["dit_forward_seconds"] for step in steps]
        labels = [f"{step['index']}\n{step['expert']}" for step in steps]
        ax.bar(labels, forwards, label="DiT forwards")
        ax.bar(labels, [step["other_seconds"] for step in steps], bottom=forwards, alpha=0.4,
               label="scheduler, expert swap, waits")
        ax.set(title=name, ylabel="seconds")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(folder / "steps.png", dpi=90)
    plt.close(fig)


def non_finite_to_none(value: Any, path: str = "") -> tuple[Any, list[str]]:
    """`value` with every NaN/infinity replaced by None, and where they were: JSON has no
    NaN, and one bad figure must not cost the report the others (check_report flags them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None, [path]
    found: list[str] = []
    if isinstance(value, dict):
        cleaned = {}
        for key, item in value.items():
            cleaned[key], where = non_finite_to_none(item, f"{path}/{key}")
            found += where
        return cleaned, found
    if isinstance(value, list):
        items = []
        for index, item in enumerate(value):
            clean, where = non_finite_to_none(item, f"{path}/{index}")
            items.append(clean)
            found += where
        return items, found
    return value, found


def write(report: dict[str, Any], folder: Path) -> Path:
    """The report folder, atomically: plots first (a plot that fails is noted, never fatal)."""
    cleaned, report["non_finite"] = non_finite_to_none(report)
    report.update(cleaned)

    def fill(staging: Path) -> None:
        if importlib.util.find_spec("matplotlib") is None:
            report["plots"] = {"written": False, "note": "skipped: matplotlib is not importable"}
        else:
            try:
                write_plots(report, staging)
                report["plots"] = {"written": True, "note": "sections.png (median seconds per case), steps.png "
                                                            "(per-step times of the end-to-end runs)"}
            except Exception as error:
                report["plots"] = {"written": False, "note": f"failed: {_one_line(error)}"}
        (staging / "report.json").write_text(json_text(report))
        (staging / "report.md").write_text(markdown(report))

    return write_folder_atomically(folder, fill)


def short_table(report: dict[str, Any]) -> str:
    lines = [f"{'section':<24} {'case':<52} {'seconds':>9} {'error':>9} {'peak VRAM':>10}"]
    for section in report["sections"]:
        if section["status"] != Status.OK.value:
            lines.append(f"{section['name']:<24} {section['status'].upper()}: {section['note']}")
            continue
        for row in section["rows"]:
            lines.append(f"{section['name']:<24} {row['case'][:52]:<52} {row['seconds']:>9.4g} "
                         f"{_num(row['error']):>9} {_bytes(row['peak_vram_bytes']):>10}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- main


def new_report(suite: Suite, selected: tuple[str, ...], tiny: bool) -> dict[str, Any]:
    env = environment(suite.device)
    env["versions"].update(triton=_version("triton"), accelerate=_version("accelerate"))
    return {
        "format": REPORT_FORMAT, "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tiny": tiny, "note": TINY_NOTE if tiny else None, "weights": "random", "weights_note": RANDOM_WEIGHTS_NOTE,
        "environment": env, "settings": settings(suite.device), "budget_s": suite.budget_s, "stopped": None,
        "workload": dataclasses.asdict(suite.workload), "definitions": DEFINITIONS, "selected": list(selected),
        "sections": [],
        "running": "start-up",  # what is in flight (what the hard stop reports as cut short)
    }


def run_suite(report: dict[str, Any], suite: Suite, tiny: bool, progress: Callable[[str], None]) -> None:
    """Run the selected sections in order, appending each one's record to the report."""
    # One unmeasured tiny pipeline run first: the process's one-time costs (CUDA context,
    # library handles, first kernels) fall on no section.
    progress("warm-up: one unmeasured tiny-t2v run")
    report["running"] = "warm-up"
    measure_pipeline(ModelSource(WARM_UP), Strategy.WANRT, request_for(WARM_UP), suite.device, flops_for(WARM_UP),
                     suite.peak_of, embeddings=random_embeddings(WARM_UP.spec))
    for section in SECTIONS:
        estimate = section.tiny_estimate_s if tiny else section.estimate_s
        if section.name not in report["selected"]:
            report["sections"].append(section_record(section, estimate, Status.SKIPPED, NOT_SELECTED))
            continue
        progress(f"{section.name}: {suite.left_s():.0f} s of the budget left")
        report["running"] = section.name
        record = run_section(section, suite, estimate)
        progress(f"{section.name}: {record['status']} in {_num(record['seconds'])} s"
                 + (f" ({record['note']})" if record["note"] else ""))
        report["sections"].append(record)
    report["running"] = None
    report["elapsed_s"] = time.perf_counter() - suite.started


def finish(report: dict[str, Any], folder: Path) -> Path:
    written = write(report, folder)
    print(f"report: {written}")
    print(short_table(report), flush=True)
    return written


def hard_stop(report: dict[str, Any], suite: Suite, folder: Path, limit_s: float, tiny: bool,
              finishing: threading.Lock) -> threading.Timer:
    """The budget skips sections estimated not to fit, but one that overruns its estimate
    by far would run into the caller's own limit (the GPU call's 600 s) and lose every
    figure. At `limit_s` after the start this writes what was measured, marks the section
    in flight as cut short and the rest as not reached, and ends the process (exit code 3)."""

    def stop() -> None:
        if not finishing.acquire(blocking=False):
            return  # the suite is writing its own report
        done = {record["name"] for record in report["sections"]}
        running = report["running"]
        stopped = f"stopped at the hard limit, {limit_s:g} s after the start, during {running}"
        records = list(report["sections"])
        for section in SECTIONS:
            if section.name not in done:
                estimate = section.tiny_estimate_s if tiny else section.estimate_s
                status, note = ((Status.FAILED, stopped) if section.name == running else
                                (Status.SKIPPED, f"not reached: {stopped}") if section.name in report["selected"]
                                else (Status.SKIPPED, NOT_SELECTED))
                records.append(section_record(section, estimate, status, note))
        finish({**report, "sections": records, "stopped": stopped,
                "elapsed_s": time.perf_counter() - suite.started}, folder)
        os._exit(3)  # the main thread is inside the section; nothing else may be written

    timer = threading.Timer(max(0.0, limit_s - (time.perf_counter() - suite.started)), stop)
    timer.daemon = True
    timer.start()
    return timer


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="results folder; the run gets <device>-<date>/ in it")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help="wall seconds for the sections; one whose estimate does not fit is skipped")
    parser.add_argument("--hard-stop", type=float, default=None,
                        help="wall seconds after which the report is written and the run ends, whatever is "
                             f"running (default: the budget + {HARD_STOP_MARGIN_S:g})")
    parser.add_argument("--sections", default=",".join(SECTION_NAMES),
                        help=f"comma-separated subset of: {', '.join(SECTION_NAMES)}")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: checks the suite, claims nothing")
    args = parser.parse_args(argv)
    selected = tuple(name.strip() for name in args.sections.split(",") if name.strip())
    unknown = sorted(set(selected) - set(SECTION_NAMES))
    if unknown:
        parser.error(f"--sections: unknown {', '.join(unknown)}; choose from {', '.join(SECTION_NAMES)}")
    for flag, value in (("--budget", args.budget), ("--hard-stop", args.hard_stop)):
        if value is not None and not value > 0:
            parser.error(f"{flag} {value:g} must be a positive number of seconds")
    # As the `wanrt` CLI sets it, before CUDA starts (the allocator reads it then): what users run with.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if args.tiny:
        device, workload = torch.device("cpu"), TINY
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton kernels on the CPU; read at their import
    elif torch.cuda.is_available():
        device, workload = torch.device("cuda"), FULL
    else:
        parser.error("full-size sections need a CUDA GPU; use --tiny on a CPU-only machine")
    folder = run_folder(args.out, folder_name(device, datetime.now(timezone.utc)))  # refused before any work

    def progress(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    suite = Suite(device, workload, args.budget, started=PROCESS_START)
    report = new_report(suite, selected, args.tiny)
    finishing = threading.Lock()
    timer = hard_stop(report, suite, folder, args.hard_stop or args.budget + HARD_STOP_MARGIN_S, args.tiny,
                      finishing)
    run_suite(report, suite, args.tiny, progress)
    finishing.acquire()  # blocks for good if the hard stop is writing: it ends the process
    timer.cancel()
    gc.collect()
    written = finish(report, folder)
    check_report(report)  # after writing: a report that breaks a promise is still there to read
    return written


if __name__ == "__main__":
    main()
