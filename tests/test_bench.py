"""`wanrt bench`: FLOP counts against hand-computed values, scenario files, the harness on
tiny scenarios (report fields, ratios, fidelity, plots) and the CLI's one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import assert_parity
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner
from wanrt.cli.app import app

from wanrt.bench import report as bench_report
from wanrt.bench.baselines import to_diffusers_transformer
from wanrt.bench.flops import (block_flops, device_peak, dit_forward_flops, run_flops, t5_flops,
                               vae_decode_flops)
from wanrt.bench.harness import CPU_NOTE, ratios, run_benchmarks
from wanrt.bench.measure import steady_step_seconds
from wanrt.bench.models import random_dit
from wanrt.bench.scenarios import FIELDS, Baseline, Scenario, Weights, load_scenario_file
from wanrt.configs import get_task
from wanrt.errors import InputError
from wanrt.models.t5 import UMT5Encoder
from wanrt.random_weights import randomize_
from wanrt.runtime.planner import token_grid
from wanrt.runtime.streaming import block_layout

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("cache_dir")


def wanrt(*args: object):
    return runner.invoke(app, [str(arg) for arg in args])


def assert_one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------- FLOPs


def test_dit_flops_of_the_real_configs_equal_hand_computed_values():
    # t2v-A14B, 832*480, 81 frames: latents 21x60x104, patches 1x2x2 -> 21*30*52 = 32,760
    # tokens; d=5120, ffn 13824, 40 blocks, text_len 512, text_dim 4096, freq_dim 256.
    a14b_task = get_task("t2v-A14B")
    assert math.prod(token_grid(a14b_task, "832*480", 81)) == 32_760
    # Block: 8·L·d² (q,k,v,o) + 4·L²·d (QK^T, PV) + 4·L·d² (cross q,o) + 4·Lt·d² (cross k,v on
    # the embedded context) + 4·L·Lt·d (cross QK^T, PV) + 4·L·d·ffn. The figure published in
    # benchmarks/results/dit_block_h100.json (41.9569664 TFLOP) is the same count.
    assert block_flops(a14b_task.dit, 32_760) == 41_956_966_400_000
    # + patch 2·L·(16·4)·d, text MLP 2·Lt·(4096·d + d²), time MLP 2·(256·d + d² + 6d²),
    # head 2·L·d·(4·16).
    assert dit_forward_flops(a14b_task.dit, 32_760).total == 1_678_370_283_192_320

    # ti2v-5B, 1280*704, 121 frames: latents 31x44x80 -> 31*22*40 = 27,280 tokens; d=3072,
    # ffn 14336, 30 blocks, 48 latent channels in and out.
    ti2v_task = get_task("ti2v-5B")
    assert math.prod(token_grid(ti2v_task, "1280*704", 121)) == 27_280
    assert block_flops(ti2v_task.dit, 27_280) == 17_230_690_516_992  # dit_block_h100.json too
    assert dit_forward_flops(ti2v_task.dit, 27_280).total == 517_007_759_376_384

    # umt5-xxl: 2 prompts x 24 layers x (8·512·4096² + 4·512²·4096 + 6·512·4096·10240).
    assert t5_flops(a14b_task.t5) == t5_flops(ti2v_task.t5) == 9_689_446_219_776


def test_run_flops_count_both_guidance_forwards_of_every_step():
    flops = run_flops(get_task("tiny-t2v"), "64*64", 9, steps=3)
    assert flops.tokens == 3 * 4 * 4 and flops.latent_grid == (3, 8, 8)
    assert flops.per_step == 2 * dit_forward_flops(get_task("tiny-t2v").dit, 48).total
    assert flops.sampling == 3 * flops.per_step
    assert flops.vae_decode == vae_decode_flops(get_task("tiny-t2v").vae, (3, 8, 8))


@pytest.mark.parametrize("task_name,per_token", [("tiny-t2v", False), ("tiny-i2v", False), ("tiny-ti2v", True)])
def test_dit_flops_equal_what_torch_counts_on_the_tiny_model(task_name, per_token):
    task = get_task(task_name)
    config = task.dit
    model = random_dit(config, 0, torch.device("cpu"), torch.float32)
    frames, height, width = 3, 8, 8
    z_dim = task.vae.z_dim
    x = torch.randn(1, z_dim, frames, height * 2, width * 2)
    y = torch.randn(1, config.in_dim - z_dim, frames, height * 2, width * 2) if config.in_dim > z_dim else None
    tokens = frames * height * width
    timestep = torch.full((1, tokens) if per_token else (1,), 900)
    # The math SDPA backend decomposes attention into counted matmuls.
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(x, timestep, torch.randn(1, 7, config.text_dim), y=y)
    assert counter.get_total_flops() == dit_forward_flops(config, tokens, per_token).total


def test_t5_flops_equal_what_torch_counts_on_the_tiny_encoder():
    config = get_task("tiny-t2v").t5
    encoder = randomize_(UMT5Encoder(config), seed=0)
    ids = torch.randint(0, config.vocab_size, (2, config.text_len))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        encoder(ids, torch.ones_like(ids))
    assert counter.get_total_flops() == t5_flops(config)


def test_vae_decode_flops_counted_on_meta_match_a_real_decode():
    from wanrt.models.vae import WanVAE

    task = get_task("tiny-t2v")
    vae = randomize_(WanVAE(task.vae), seed=0)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vae.decode(torch.randn(1, task.vae.z_dim, 3, 8, 8))
    real_convolutions = counter.get_total_flops()  # the CPU's fused attention is not counted
    # Meta decomposes the middle attention into matmuls: 3 latent frames, 8x8 positions at
    # 4·8 = 32 channels, QK^T and PV: 3 · 4 · 64² · 32.
    attention = 3 * 4 * 64**2 * 32
    assert vae_decode_flops(task.vae, (3, 8, 8)) == real_convolutions + attention == 2_277_736_448


def test_device_peaks_by_name():
    h100 = device_peak("NVIDIA H100 80GB HBM3")
    assert (h100.name, h100.for_precision("bf16"), h100.for_precision("fp8")) == ("H100 SXM", 989.0, 1979.0)
    assert device_peak("NVIDIA H100 PCIe").bf16 == 756.0
    assert device_peak("NVIDIA H200").for_precision("bf16") == 989.0
    rtx = device_peak("NVIDIA GeForce RTX 4090")
    assert (rtx.bf16, rtx.fp8) == (165.2, 330.3)
    assert device_peak("NVIDIA A100-SXM4-80GB").for_precision("fp8") is None
    assert device_peak("Tesla T4") is None and device_peak("cpu") is None


# ---------------------------------------------------------------------- scenarios


def test_scenario_files_json_and_toml_with_defaults(tmp_path, checkpoints):
    (tmp_path / "ckpt").symlink_to(checkpoints["tiny-t2v"])
    json_file = tmp_path / "s.json"
    json_file.write_text(json.dumps({
        "defaults": {"steps": 2, "baselines": ["official"]},
        "scenarios": [{"task": "tiny-t2v", "size": "96*64", "vram_gib": 8},
                      {"name": "real", "task": "tiny-t2v", "weights": "checkpoint", "ckpt_dir": "ckpt",
                       "baselines": "none", "precision": "int8"}]}))
    first, second = load_scenario_file(json_file)
    assert (first.name, first.size, first.frames, first.steps) == ("tiny-t2v-96x64-9f-2steps-bf16-8GiB", "96*64", 9, 2)
    assert first.baselines == (Baseline.OFFICIAL,) and first.weights is Weights.RANDOM
    assert second.ckpt_dir == tmp_path / "ckpt" and second.baselines == () and second.precision.value == "int8"
    assert set(first.settings()) == set(FIELDS)

    toml_file = tmp_path / "s.toml"
    toml_file.write_text('[defaults]\nsteps = 3\n\n[[scenarios]]\nname = "a"\ntask = "tiny-ti2v"\n')
    (only,) = load_scenario_file(toml_file)
    assert (only.name, only.size, only.frames, only.steps) == ("a", "128*64", 9, 3)


@pytest.mark.parametrize("content,needles", [
    ('{"scenarios": [{"task": "tiny-t2v", "sizes": "64*64"}]}', ["scenario #1", "unknown key(s) sizes"]),
    ('{"scenarios": [{"task": "tiny-t2v", "size": "1*1"}]}', ["scenario #1", "--size 1*1"]),
    ('{"scenarios": [{"task": "tiny-t2v", "steps": "3"}]}', ["steps must be an integer"]),
    ('{"scenarios": [{"task": "tiny-t2v", "weights": "checkpoint"}]}', ["needs a checkpoint folder"]),
    ('{"scenarios": [{"task": "tiny-t2v", "engine": "warp"}]}', ["'warp' is unknown", "eager"]),
    ('{"scenarios": [{"task": "tiny-t2v", "baselines": "official,nope"}]}', ["baseline 'nope' is unknown"]),
    ('{"scenarios": [{"name": "x", "task": "tiny-t2v"}, {"name": "x", "task": "tiny-ti2v"}]}', ["repeated: x"]),
    ('{"scenarios": []}', ["non-empty 'scenarios'"]),
    ('{"scenarios": [', ["not valid JSON"]),
])
def test_bad_scenario_files_are_one_line_errors(tmp_path, content, needles):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(InputError) as error:
        load_scenario_file(path)
    assert str(path) in str(error.value)
    for needle in needles:
        assert needle in str(error.value)


# ---------------------------------------------------------------------- measurement helpers


def test_steady_step_time_skips_each_experts_first_step():
    steps = [{"expert": e, "seconds": s} for e, s in
             (("high_noise", 9.0), ("high_noise", 0.5), ("low_noise", 7.0), ("low_noise", 0.7))]
    assert steady_step_seconds(steps) == pytest.approx(0.6)
    assert steady_step_seconds(steps[:1]) is None


def test_ratios_only_for_runs_that_both_finished():
    phases = {name: {"seconds": seconds, "device_peak_bytes": peak}
              for name, seconds, peak in (("t5", 1.0, 10), ("sampling", 4.0, 30), ("decode", 2.0, 20))}
    ok = {"status": "ok", "phases": phases}
    slower = {"status": "ok", "phases": {k: {**v, "seconds": 2 * v["seconds"], "device_peak_bytes": 60}
                                         for k, v in phases.items()}}
    assert ratios(ok, slower) == {"sampling_speedup": 2.0, "decode_speedup": 2.0, "sampling_and_decode_speedup": 2.0,
                                  "t5_speedup": 2.0, "peak_vram_ratio": 0.5}
    assert ratios(ok, {"status": "failed", "note": "OutOfMemoryError"}) is None


def test_diffusers_transformer_has_the_same_weights():
    diffusers = pytest.importorskip("diffusers")
    task = get_task("tiny-t2v")
    model = random_dit(task.dit, 0, torch.device("cpu"), torch.float32)
    x, t, context = torch.randn(1, 16, 3, 16, 16), torch.tensor([900]), torch.randn(1, 16, task.dit.text_dim)
    with torch.no_grad():
        expected = model(x, t, context)
        converted = to_diffusers_transformer(diffusers, model, torch.float32)
        actual = converted(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)[0]
    assert_parity(actual, expected, "diffusers transformer")


# ---------------------------------------------------------------------- the harness, end to end


def _no_nan(text: str):
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in report.json"))


def test_bench_cli_runs_tiny_scenarios_and_writes_the_report(tmp_path, checkpoints):
    scenario_file = tmp_path / "tiny.json"
    scenario_file.write_text(json.dumps({"scenarios": [
        # One of the two blocks resident: the other streams, so bytes are copied per forward.
        # One frame keeps the CPU's VAE decode short; 3 steps cross the MoE boundary.
        {"name": "streamed", "task": "tiny-t2v", "frames": 1, "steps": 3, "resident_blocks": 1},
        {"name": "checkpoint", "task": "tiny-t2v", "frames": 1, "steps": 1, "weights": "checkpoint",
         "ckpt_dir": str(checkpoints["tiny-t2v"]), "precision": "int8", "baselines": ["official"]},
        {"name": "i2v", "task": "tiny-i2v", "frames": 1, "steps": 1, "baselines": ["diffusers"]},
    ]}))
    result = wanrt("bench", "--scenario", scenario_file, "--out", tmp_path / "results", "--name", "run")
    assert result.exit_code == 0, result.output
    folder = tmp_path / "results" / "run"
    assert sorted(p.name for p in folder.iterdir()) == sorted(bench_report.REPORT_FILES)
    assert [p.name for p in (tmp_path / "results").iterdir()] == ["run"]  # no staging left
    assert f"report: {folder / 'report.md'}" in result.stdout
    assert CPU_NOTE in result.stderr
    # A tiny scenario's speedup carries its caveat on the same line and in the report.
    speedup_line = next(line for line in result.stdout.splitlines() if line.startswith("checkpoint:"))
    assert "sampling speedup over official" in speedup_line and bench_report.SMOKE_CAVEAT in speedup_line
    assert f"(baseline s / wanrt s) ({bench_report.SMOKE_CAVEAT}):" in (folder / "report.md").read_text()

    report = _no_nan((folder / "report.json").read_text())
    assert report["format"] == "wanrt-bench/1" and report["cpu_only"] is True and report["note"] == CPU_NOTE
    assert report["weights"] == "mixed" and "random weights" in report["weights_note"]
    env = report["environment"]
    assert env["device"]["type"] == "cpu" and env["device"]["peak_tflops"] == "unknown"
    assert {"python", "torch", "wanrt", "diffusers", "cuda", "git_commit"} <= set(env["versions"])
    assert env["versions"]["torch"] == torch.__version__
    streamed, checkpoint, i2v = report["scenarios"]

    # Every setting is recorded, and the FLOPs are those of the scenario.
    assert set(streamed["settings"]) == set(FIELDS) and streamed["settings"]["resident_blocks"] == 1
    assert streamed["flops"] == run_flops(get_task("tiny-t2v"), "64*64", 1, 3).to_dict()
    assert streamed["weights"] == "random" and checkpoint["weights"] == "checkpoint"
    block_bytes = block_layout(random_dit(get_task("tiny-t2v").dit, 0, torch.device("cpu"), torch.float32)
                               .blocks[1])[1]
    for name in ("wanrt", "official", "diffusers"):
        run = streamed["runs"][name]
        assert run["status"] == "ok", run["note"]
        expected_phases = {"sampling", "decode"} | ({"t5"} if name != "diffusers" else set())
        assert set(run["phases"]) == expected_phases
        for phase in run["phases"].values():
            assert phase["seconds"] > 0 and phase["device_peak_bytes"] is None and phase["host_peak_bytes"] > 0
        # diffusers' flow sigmas round to slightly different timesteps than the official ones.
        timesteps = (999, 960, 857) if name == "diffusers" else (999, 959, 856)
        assert [(s["timestep"], s["expert"], s["forwards"]) for s in run["steps"]] == [
            (timesteps[0], "high_noise", 2), (timesteps[1], "high_noise", 2), (timesteps[2], "low_noise", 2)]
        for step in run["steps"]:
            assert 0 < step["dit_forward_seconds"] <= step["seconds"]
            assert step["dit_flops"] == 2 * streamed["flops"]["dit_forward"]["total"]
        summary = run["summary"]
        assert summary["achieved_tflops"]["dit"] > 0 and summary["peak_tflops"] is None
        assert summary["dit_fraction_of_peak"] is None  # no peak on a CPU: no ratio
        memory = run["memory"]
        assert len(memory["t_s"]) == len(memory["host_rss_bytes"]) >= 2
        assert [span["name"] for span in memory["phases"]] == sorted(expected_phases, key=["t5", "sampling",
                                                                                            "decode"].index)
    # wanrt streamed one block per forward (6 forwards); the official strategy streams nothing.
    assert streamed["runs"]["wanrt"]["summary"]["streamed_bytes"] == 6 * block_bytes
    assert streamed["runs"]["wanrt"]["summary"]["h2d_gb_per_s"] > 0
    assert streamed["runs"]["official"]["summary"]["streamed_bytes"] == 0
    assert "resident blocks" in streamed["runs"]["wanrt"]["setup"]["dit"]
    assert streamed["runs"]["wanrt"]["setup"]["engine"] == "eager"
    # Streaming is exact: wanrt and the official strategy produce the same latents and video.
    assert streamed["fidelity_reference"] == "official"
    assert streamed["runs"]["wanrt"]["fidelity"]["identical"] is True
    # diffusers: the same transformer weights (see the parity test) under diffusers' UniPC,
    # whose flow sigmas start at 1.0 instead of 0.9999; measured ~0.14 relative L2 here.
    diffusers_fidelity = streamed["runs"]["diffusers"]["fidelity"]
    assert 0 < diffusers_fidelity["latents_rel_l2"] < 0.3 and diffusers_fidelity["video_psnr_db"] > 20
    for baseline in ("official", "diffusers"):
        ratio = streamed["ratios"][baseline]
        assert all(math.isfinite(ratio[key]) and ratio[key] > 0
                   for key in ("sampling_speedup", "decode_speedup", "sampling_and_decode_speedup"))
        assert ratio["peak_vram_ratio"] is None

    assert checkpoint["runs"]["wanrt"]["status"] == checkpoint["runs"]["official"]["status"] == "ok"
    # Loaded lazily, as `wanrt generate` loads: a one-step run needs only the high-noise expert.
    assert set(checkpoint["runs"]["wanrt"]["setup"]["load_seconds"]) == {"t5", "dit_high_noise", "vae"}
    # int8 as the default policy quantizes: the first and last blocks stay bf16, which for a
    # two-block model is all of them, so the result equals the bf16 official strategy's.
    assert checkpoint["runs"]["wanrt"]["setup"]["quantization"]["high_noise"].startswith("int8: 0/26 linears")
    assert checkpoint["runs"]["official"]["setup"]["precision"] == "bf16"
    assert checkpoint["runs"]["wanrt"]["fidelity"]["identical"] is True
    assert i2v["runs"]["wanrt"]["status"] == "ok"
    assert i2v["runs"]["diffusers"]["status"] == "skipped" and "i2v" in i2v["runs"]["diffusers"]["note"]
    assert i2v["ratios"] == {"diffusers": None}

    markdown = (folder / "report.md").read_text()
    assert CPU_NOTE in markdown and "random weights" in markdown
    for name in ("streamed", "checkpoint", "i2v"):
        assert f"## Scenario `{name}`" in markdown
    assert "Speedup of wanrt over each baseline" in markdown and "skipped" in markdown
    for png in ("step_time.png", "memory.png", "achieved_vs_peak.png"):
        with Image.open(folder / png) as image:
            image.verify()
        with Image.open(folder / png) as image:
            assert image.format == "PNG" and min(image.size) >= 300


def test_a_failing_report_write_leaves_nothing(tmp_path, monkeypatch):
    def broken(report, folder):
        raise RuntimeError("plot failed")
    monkeypatch.setattr(bench_report, "write_plots", broken)
    report = {"note": None, "weights_note": None, "weights": "random", "created_utc": "now", "definitions": {},
              "environment": {"device": {"name": "cpu", "peak_tflops": "unknown"},
                              "host": {"cpus": 1, "ram_bytes": 1, "platform": "x"}, "versions": {}},
              "scenarios": []}
    with pytest.raises(RuntimeError):
        bench_report.write_report(report, tmp_path / "results", "run")
    assert list((tmp_path / "results").iterdir()) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_on_cuda_measures_with_events_peaks_and_the_cap(tmp_path):
    scenario = Scenario(name="cuda", task="tiny-t2v", frames=1, steps=3, resident_blocks=1, vram_gib=4.0)
    report = run_benchmarks((scenario,), torch.device("cuda"))
    (measured,) = report["scenarios"]
    for name, run in measured["runs"].items():
        assert run["status"] == "ok", (name, run["note"])
        assert run["setup"]["clock"] == "cuda_events"
        for phase in run["phases"].values():
            assert 0 < phase["device_peak_bytes"] <= 4 * 2**30
        assert any(value for value in run["memory"]["device_allocated_bytes"])
    wanrt = measured["runs"]["wanrt"]
    assert wanrt["summary"]["streamed_bytes"] > 0 and wanrt["summary"]["h2d_gb_per_s"] > 0
    peak = device_peak(torch.cuda.get_device_name())
    assert wanrt["summary"]["peak_tflops"] == (peak.bf16 if peak else None)
    assert measured["runs"]["diffusers"]["setup"]["offload"] == "group"  # the VRAM cap asks for it
    assert wanrt["fidelity"]["latents_rel_l2"] < 1e-2  # streamed and whole-expert bf16 runs agree
    assert measured["ratios"]["official"]["peak_vram_ratio"] > 0
    folder = bench_report.write_report(report, tmp_path, "cuda")
    assert sorted(p.name for p in folder.iterdir()) == sorted(bench_report.REPORT_FILES)


# ---------------------------------------------------------------------- CLI errors


@pytest.mark.parametrize("args,needles", [
    (["--task", "t2v-A14B", "--steps", 1], ["need a CUDA device", "tiny-t2v"]),
    (["--size", "64*64"], ["--size describes a scenario", "--task"]),
    (["--task", "tiny-t2v", "--size", "1*1"], ["--size 1*1", "64*64"]),
    (["--task", "tiny-t2v", "--frames", 10], ["4n+1"]),
    (["--task", "tiny-t2v", "--vram", -1], ["vram_gib -1", "positive"]),
    (["--task", "tiny-t2v", "--baselines", "official,foo"], ["baseline 'foo' is unknown", "official, diffusers"]),
    (["--task", "tiny-t2v", "--random-weights", "--ckpt-dir", "."], ["exclude each other"]),
    (["--task", "tiny-t2v", "--ckpt-dir", "/no/such/folder"], ["/no/such/folder not found"]),
    (["--task", "nope"], ["unknown task 'nope'"]),
    (["--task", "tiny-t2v", "--engine", "warp"], ["--engine", "warp"]),
    (["--task", "tiny-t2v", "--name", "a/b"], ["--name 'a/b'"]),
    (["--task", "tiny-t2v", "--steps", "abc"], ["--steps"]),
])
def test_bad_flags_are_one_line_errors_before_anything_runs(tmp_path, args, needles):
    result = wanrt("bench", *args, "--out", tmp_path / "results")
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").iterdir())


def test_scenario_file_excludes_flags_and_existing_reports_are_kept(tmp_path):
    scenario_file = tmp_path / "s.json"
    scenario_file.write_text('{"scenarios": [{"task": "tiny-t2v"}]}')
    assert_one_line_error(wanrt("bench", "--scenario", scenario_file, "--task", "tiny-t2v", "--steps", 2),
                          "--scenario replaces the scenario flags", "--task, --steps")
    assert_one_line_error(wanrt("bench", "--scenario", tmp_path / "missing.json"), "file not found")
    existing = tmp_path / "results" / "taken"
    existing.mkdir(parents=True)
    assert_one_line_error(wanrt("bench", "--scenario", scenario_file, "--out", tmp_path / "results",
                                "--name", "taken"), "already exists", "--name")
    assert list(existing.iterdir()) == []
