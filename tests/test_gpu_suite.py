"""benchmarks/gpu_suite.py on tiny shapes on the CPU: the suite runs end to end as it will
on the GPU machine (without the packages that machine lacks), its report keeps its
promises, and the budget, skip and failure rules hold."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu_suite  # noqa: E402
from gpu_suite import (SECTION_NAMES, TINY, DegenerateOutput, Row, Section, SectionSkipped, Status, Suite,  # noqa: E402
                       check_report, require_signal, run_section)

from wanrt.bench.harness import request_for  # noqa: E402
from wanrt.loading.checkpoint import Expert  # noqa: E402
from wanrt.pipelines import Pipeline  # noqa: E402
from wanrt.runtime.planner import GIB, choose_vae_tiling  # noqa: E402

# Python packages the GPU image does not have (see the device notes): the suite must run without them.
DEVICE_LACKS = ("av", "ftfy", "gguf", "diffusers", "optimum", "bitsandbytes", "tensorrt")
ENGINE_SECTIONS = ("engines-bf16-480p", "engines-fp8-480p")


def run_without_device_lacks(*args: str) -> subprocess.CompletedProcess:
    code = (f"import runpy, sys; sys.modules.update(dict.fromkeys({DEVICE_LACKS!r})); "
            f"sys.argv = ['gpu_suite.py', *{list(args)!r}]; "
            f"runpy.run_path({str(BENCHMARKS / 'gpu_suite.py')!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory) -> tuple[dict, Path, str]:
    """Every section but the engine builds (minutes of C++ compilation on a CPU: the slow test)."""
    out = tmp_path_factory.mktemp("suite")
    selected = [name for name in SECTION_NAMES if name not in ENGINE_SECTIONS]
    result = run_without_device_lacks("--tiny", "--out", str(out), "--sections", ",".join(selected))
    assert result.returncode == 0, result.stderr[-3000:]
    (folder,) = out.iterdir()
    return json.loads((folder / "report.json").read_text()), folder, result.stdout


def sections_of(report: dict) -> dict[str, dict]:
    return {section["name"]: section for section in report["sections"]}


def rows_of(section: dict) -> dict[str, dict]:
    return {row["case"]: row for row in section["rows"]}


def test_the_tiny_run_writes_the_whole_report_atomically_and_prints_the_table_last(tiny_report):
    report, folder, stdout = tiny_report
    assert folder.name.startswith("cpu-")
    assert sorted(p.name for p in folder.iterdir()) == ["report.json", "report.md", "sections.png", "steps.png"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging folder left
    assert report["format"] == "wanrt-gpu-suite/1" and report["tiny"] and report["note"]
    assert report["environment"]["versions"]["torch"] == torch.__version__
    assert "triton" in report["environment"]["versions"] and report["settings"]["compute_dtype"] == "bfloat16"
    assert 0 < report["elapsed_s"] and report["budget_s"] == gpu_suite.DEFAULT_BUDGET_S
    assert [s["name"] for s in report["sections"]] == list(SECTION_NAMES)
    check_report(report)
    lines = stdout.strip().splitlines()
    assert lines[0] == f"report: {folder}" and lines[1].split()[:2] == ["section", "case"]
    assert lines[-1].startswith("diffusers-t2v-a14b-480p") and "SKIPPED" in lines[-1]
    markdown = (folder / "report.md").read_text()
    assert "## e2e-t2v-a14b-480p" in markdown and "(extrapolated)" in markdown


def test_every_section_ran_or_says_why_not(tiny_report):
    sections = sections_of(tiny_report[0])
    for name in ENGINE_SECTIONS:
        assert (sections[name]["status"], sections[name]["note"]) == ("skipped", "not selected (--sections)")
    diffusers = sections["diffusers-t2v-a14b-480p"]
    assert diffusers["status"] == "skipped" and "diffusers" in diffusers["note"]
    ran = [name for name in SECTION_NAMES if name not in ENGINE_SECTIONS and not name.startswith("diffusers")]
    assert {name: sections[name]["status"] for name in ran} == dict.fromkeys(ran, "ok")
    for name in ran:
        assert 0 < sections[name]["seconds"] and sections[name]["estimate_s"] > 0


def test_block_rows_cover_each_precision_with_its_error_against_bf16(tiny_report):
    blocks = sections_of(tiny_report[0])["blocks"]
    rows = rows_of(blocks)
    for size in ("480P", "720P"):
        assert rows[f"{size} bf16 eager"]["error"] == 0.0
        for scheme in ("fp8", "int8"):
            # every Linear of a bare block is quantized: a real, small error
            assert 1e-4 < rows[f"{size} {scheme} eager"]["error"] < 0.05
            assert rows[f"{size} {scheme} eager"]["error_metric"] == "rel_l2_vs_bf16"
    assert "optimum-quanto" in blocks["details"]["schemes_skipped"]


def test_each_sdpa_kernel_forced_is_timed_against_the_default_dispatch(tiny_report):
    section = sections_of(tiny_report[0])["attention-a14b"]
    rows = rows_of(section)
    assert set(rows) == {f"{size} {kernel}" for size in ("480P", "720P")
                         for kernel in ("default dispatch", "math", "flash_attention")}
    assert rows["480P default dispatch"]["error"] == 0.0
    assert 0 < rows["480P math"]["error"] < 1e-2  # another kernel: bf16 rounding apart, no more
    assert section["details"]["unavailable"] == {}


def test_streamed_expert_equals_resident_and_quantized_experts_say_their_error(tiny_report):
    rows = rows_of(sections_of(tiny_report[0])["expert-a14b-480p"])
    assert set(rows) == {"480P bf16 resident", "480P bf16 streamed (24 GiB cap)", "480P fp8 resident",
                         "480P int8 resident"}
    streamed = rows["480P bf16 streamed (24 GiB cap)"]
    assert streamed["error"] == 0.0 and streamed["extra"]["streamed_bytes_per_forward"] > 0
    assert all(row["runs"] == TINY.expert_iters for row in rows.values())


def test_end_to_end_rows_measure_steps_and_extrapolate_the_default_schedule(tiny_report):
    sections = sections_of(tiny_report[0])
    t2v = sections["e2e-t2v-a14b-480p"]
    steps = t2v["details"]["run"]["steps"]
    assert [step["expert"] for step in steps] == ["high_noise"] * 3 + ["low_noise"]  # crosses the boundary
    rows = rows_of(t2v)
    steady = rows["steady step (median)"]["seconds"]
    assert math.isclose(steady, statistics.median([steps[1]["seconds"], steps[2]["seconds"]]))
    extrapolated = rows["6-step sampling (extrapolated)"]  # tiny-t2v's default schedule is 6 steps
    assert extrapolated["extrapolated"] and extrapolated["runs"] == 0
    assert math.isclose(extrapolated["seconds"], steps[0]["seconds"] + steps[3]["seconds"] + 4 * steady)
    assert rows["VAE decode"]["seconds"] > 0
    ti2v_rows = rows_of(sections["e2e-ti2v-5b-720p"])
    assert "first step of the only expert (places it)" in ti2v_rows
    assert sections["e2e-ti2v-5b-720p"]["details"]["scenario"]["task"] == "tiny-ti2v"
    vae_rows = rows_of(sections["vae-decode"])
    assert [row["extra"]["video_shape"] for row in vae_rows.values()] == [[3, 1, 64, 64], [3, 1, 64, 96]]


@pytest.mark.parametrize("size", ["480P", "720P"])
def test_eight_bit_attention_and_blocks_are_timed_against_bf16_sdpa(tiny_report, size):
    section = sections_of(tiny_report[0])[f"attention-8bit-{size.lower()}"]
    rows = rows_of(section)
    # On the CPU the Triton kernel runs in the interpreter, with fp16 P·V (fp8 needs SM89+).
    assert set(rows) == {f"{size} attention sdpa-bf16", f"{size} attention sage-int8qk-fp16pv",
                         *(f"{size} block {linears} linears, {attention}" for linears, attention in
                           (("bf16", "sdpa-bf16"), ("bf16", "sage-int8qk-fp16pv"), ("fp8", "sage-int8qk-fp16pv"),
                            ("int8", "sage-int8qk-fp16pv")))}
    assert rows[f"{size} attention sdpa-bf16"]["error"] == 0.0
    assert rows[f"{size} attention sdpa-bf16"]["extra"]["speedup_vs_bf16_sdpa"] == 1.0
    assert 1e-4 < rows[f"{size} attention sage-int8qk-fp16pv"]["error"] < 0.05  # 8-bit: a real, small error
    for case, row in rows.items():
        assert row["runs"] == TINY.block_iters and row["extra"]["speedup_vs_bf16_sdpa"] > 0, case
        assert row["error_metric"] == "rel_l2_vs_bf16" and row["error"] < 0.05, case
    assert rows[f"{size} block fp8 linears, sage-int8qk-fp16pv"]["extra"]["linear_kernels"]
    assert section["details"]["grid_fhw"] == list(Suite(torch.device("cpu"), TINY, 1.0).grid(size))


def test_the_four_step_lora_run_times_each_step_apart_from_the_one_time_work(tiny_report):
    section = sections_of(tiny_report[0])["e2e-distill-lora-t2v-a14b-480p"]
    run, rows = section["details"]["result"], rows_of(section)
    assert (run["task"], run["size"], run["sampler"], run["lora_rank"]) == ("tiny-t2v", "64*64", "distill", 64)
    assert run["dit_forwards"] == 4 and run["video_finite"] and run["video_shape"] == [3, 1, 64, 64]
    # 4 distill steps cross the expert boundary once, with one forward each (no CFG).
    steps = [rows[f"step {index} ({expert})"]["seconds"]
             for index, expert in enumerate(["high_noise"] * 2 + ["low_noise"] * 2)]
    assert steps == run["step_seconds"] and sum(steps) <= run["sampling_seconds"]
    total = rows["4 steps + decode (one-time pinning excluded)"]
    assert math.isclose(total["seconds"], run["sampling_seconds"] + run["decode_seconds"])
    assert total["extra"]["dit_forwards"] == 4
    assert rows["one-time: planning and pinning (a 1-step run)"]["seconds"] == run["first_use_seconds"]


def test_the_tiled_decode_goes_through_the_planners_tiling(tiny_report):
    section = sections_of(tiny_report[0])["vae-decode-tiled-720p"]
    (row,) = section["rows"]
    assert section["details"]["tiles"] == 2 and section["details"]["tiling"] is not None
    assert row["case"] == "128*128 Wan2.1 VAE decode, 1 frames, 2 tiles (2.1 GiB cap)"
    assert row["extra"]["video_shape"] == [1, 3, 1, 128, 128] and row["extra"]["predicted_peak_bytes"] > 0


def test_the_full_size_workload_is_valid_before_a_gpu_sees_it():
    suite = Suite(torch.device("cpu"), gpu_suite.FULL, budget_s=540.0)
    assert (suite.grid("480P"), suite.grid("720P")) == ((21, 30, 52), (21, 45, 80))
    # The 720P A14B decode does not fit 24 GiB whole: the planner tiles it.
    size, cap_gib = gpu_suite.FULL.tiled_decode
    assert choose_vae_tiling(suite.moe.vae, (720 // 8, 1280 // 8), int(cap_gib * GIB))[0] is not None
    assert size == "1280*720"
    t2v, ti2v = gpu_suite.t2v_scenario(suite), gpu_suite.ti2v_scenario(suite)
    assert (t2v.task, t2v.size, t2v.frames, t2v.steps, t2v.vram_gib) == ("t2v-A14B", "832*480", 81, 4, 24.0)
    assert (ti2v.task, ti2v.size, ti2v.frames, ti2v.vram_gib) == ("ti2v-5B", "1280*704", 121, None)
    # Four steps swap the experts once, as the 40-step run does.
    pipeline = Pipeline.from_models(t2v.spec, {})
    timesteps = pipeline.new_scheduler(request_for(t2v)).timesteps.tolist()
    assert [pipeline.expert_for(t) for t in timesteps] == [Expert.HIGH_NOISE] * 3 + [Expert.LOW_NOISE]


def test_a_section_runs_only_if_its_estimate_fits_what_is_left_of_the_budget():
    suite = Suite(torch.device("cpu"), TINY, budget_s=10.0)

    def must_not_run(suite):
        raise AssertionError("ran past the budget")

    record = run_section(Section("big", "too big", 60, 60, must_not_run), suite, 60.0)
    assert record["status"] == "skipped" and record["note"].startswith("did not fit: estimated 60 s, ")
    assert record["seconds"] is None

    def fits(suite):
        return [Row("a case", "call", 0.5, 3)], {"detail": 1}

    record = run_section(Section("small", "fits", 1, 1, fits), suite, 1.0)
    assert record["status"] == "ok" and record["rows"][0]["case"] == "a case" and record["details"] == {"detail": 1}


def test_the_headline_claims_fit_the_default_budget_first():
    # The sections the default budget reaches by their H100 estimates, in priority order:
    # 8-bit attention (>= 2x SDPA, 8-bit block >= 1.6x bf16) and the 4-step LoRA run (<= 30 s).
    left, reached = gpu_suite.DEFAULT_BUDGET_S, []
    for section in gpu_suite.SECTIONS:
        if section.estimate_s <= left:
            reached.append(section.name)
            left -= section.estimate_s
    assert reached[:5] == ["blocks", "attention-8bit-480p", "attention-a14b", "e2e-t2v-a14b-480p",
                           "e2e-distill-lora-t2v-a14b-480p"]


@pytest.mark.parametrize("error,status,note", [
    (SectionSkipped("diffusers is not installed"), Status.SKIPPED, "diffusers is not installed"),
    (RuntimeError("out of\n memory"), Status.FAILED, "RuntimeError: out of memory"),
])
def test_a_section_that_cannot_run_or_fails_is_reported_in_one_line_and_the_suite_goes_on(error, status, note):
    def raises(suite):
        raise error

    record = run_section(Section("x", "x", 1, 1, raises), Suite(torch.device("cpu"), TINY, 100.0), 1.0)
    assert (record["status"], record["note"]) == (status.value, note)


@pytest.mark.parametrize("output", [torch.zeros(4), torch.tensor([1.0, math.nan]), torch.tensor([math.inf])])
def test_zeros_and_non_finite_outputs_are_never_timed(output):
    with pytest.raises(DegenerateOutput):
        require_signal(output, "case")
    require_signal(torch.tensor([0.0, 1e-3]), "case")


def test_check_report_refuses_a_zero_time_and_a_silent_skip():
    row = dict(case="c", per="call", seconds=0.0, runs=1, error=None, error_metric=None, extrapolated=False)
    with pytest.raises(AssertionError, match="seconds 0.0"):
        check_report({"sections": [{"name": "s", "status": "ok", "note": None, "rows": [row]}]})
    with pytest.raises(AssertionError, match="without a note"):
        check_report({"sections": [{"name": "s", "status": "skipped", "note": None, "rows": []}]})


def test_a_nan_is_written_as_null_and_flagged_and_a_failing_plot_costs_no_report(tmp_path, monkeypatch):
    row = dataclasses.asdict(Row("c", "call", 0.5, 3, error=math.nan, error_metric="rel_l2_vs_bf16"))
    suite = Suite(torch.device("cpu"), TINY, 100.0)
    report = {**gpu_suite.new_report(suite, ("s",), tiny=True), "elapsed_s": 1.0,
              "sections": [{"name": "s", "measures": "m", "estimate_s": 1, "status": "ok", "note": None,
                            "seconds": 1.0, "rows": [row], "details": {"x": [1.0, math.inf]}}]}

    def broken_plots(report, folder):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(gpu_suite, "write_plots", broken_plots)
    folder = gpu_suite.write(report, tmp_path / "run")
    written = json.loads((folder / "report.json").read_text())
    assert written["non_finite"] == ["/sections/0/rows/0/error", "/sections/0/details/x/1"]
    assert written["sections"][0]["rows"][0]["error"] is None
    assert written["plots"] == {"written": False, "note": "failed: RuntimeError: no fonts"}
    with pytest.raises(AssertionError, match="NaN/infinite values"):
        check_report(written)


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_suite.main(["--tiny", "--out", str(tmp_path), "--sections", "blocks,nope"])
    assert exit_info.value.code == 2
    assert "--sections: unknown nope; choose from blocks," in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_the_hard_stop_writes_what_was_measured_and_ends_the_run(tmp_path):
    result = run_without_device_lacks("--tiny", "--out", str(tmp_path), "--sections", "blocks,vae-decode",
                                      "--hard-stop", "0.01")
    assert result.returncode == 3, result.stderr[-3000:]
    (folder,) = tmp_path.iterdir()
    report = json.loads((folder / "report.json").read_text())
    check_report(report)
    assert report["stopped"] in [f"stopped at the hard limit, 0.01 s after the start, during {running}"
                                 for running in ("start-up", "warm-up")]
    sections = sections_of(report)
    assert sections["blocks"]["note"] == f"not reached: {report['stopped']}"
    assert sections["e2e-t2v-a14b-480p"]["note"] == "not selected (--sections)"
    assert "blocks                   SKIPPED: not reached: stopped at the hard limit" in result.stdout


@pytest.mark.slow
def test_the_engine_section_builds_and_times_compile_and_aoti(tmp_path):
    # The budget counts from the module's import, long ago in a test session: a large one.
    folder = gpu_suite.main(["--tiny", "--out", str(tmp_path), "--sections", "engines-bf16-480p", "--budget", "1e5"])
    section = sections_of(json.loads((folder / "report.json").read_text()))["engines-bf16-480p"]
    assert section["status"] == "ok", section["note"]
    rows = rows_of(section)
    assert set(rows) == {"480P bf16 eager", "480P bf16 compile", "480P bf16 aoti"}
    assert rows["480P bf16 aoti"]["extra"]["build_seconds"]["aoti"] > 0
    assert all(row["error"] < 0.05 for row in rows.values())
