"""The `wanrt` command line: official aliases, one-line errors, decode recovery, the demo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner
from wanrt.cli.app import app

from wanrt.configs import get_task
from wanrt.generate import read_latents
from wanrt.pipelines import Pipeline
from wanrt.video_io import read_video

PROMPT = "a dog walking in the city"
runner = CliRunner()


pytestmark = pytest.mark.usefixtures("cache_dir")


def wanrt(*args: object):
    return runner.invoke(app, [str(arg) for arg in args])


def assert_one_line_error(result, *needles: str, after_phase_lines: bool = False) -> str:
    """Exit 2 and the error as one last stderr line; validation errors come before any
    progress, so then stderr holds that line alone."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert after_phase_lines or len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[-1]
    return lines[-1]


def test_official_aliases_match_wanrt_spellings(checkpoints, tmp_path):
    ckpt = checkpoints["tiny-t2v"]
    wanrt_run = wanrt("generate", "--task", "tiny-t2v", "--ckpt-dir", ckpt, "--prompt", PROMPT,
                      "--frame-num", 9, "--steps", 2, "--solver", "dpm++", "--seed", 7,
                      "--guide-scale", "3.0,4.0", "--output", tmp_path / "wanrt.mp4")
    official_run = wanrt("generate", "--task", "tiny-t2v", "--ckpt_dir", ckpt, "--prompt", PROMPT,
                         "--frame_num", 9, "--sample_steps", 2, "--sample_solver", "dpm++", "--base_seed", 7,
                         "--sample_guide_scale", "3.0,4.0", "--save_file", tmp_path / "official.mp4",
                         "--offload_model", "True", "--t5_cpu", "--convert_model_dtype")
    assert wanrt_run.exit_code == 0, wanrt_run.output
    assert official_run.exit_code == 0, official_run.output
    for name, result in (("wanrt", wanrt_run), ("official", official_run)):
        assert f"video:   {tmp_path / f'{name}.mp4'}" in result.stdout
        assert f"sidecar: {tmp_path / f'{name}.json'}" in result.stdout
        assert "total:" in result.stdout
    latents = [read_latents(tmp_path / f"{name}.latents.safetensors")[0] for name in ("wanrt", "official")]
    assert torch.equal(*latents)
    assert read_video(tmp_path / "official.mp4")[0].shape[1] == 9
    sidecar = json.loads((tmp_path / "official.json").read_text())
    assert (sidecar["seed"], sidecar["settings"]["steps"], sidecar["settings"]["solver"]) == (7, 2, "dpm++")
    assert sidecar["settings"]["guide_scale"] == [3.0, 4.0]
    assert sidecar["options"]["offload_model"] is True and sidecar["options"]["convert_model_dtype"] is True


def _corrupt_image(tmp_path: Path) -> Path:
    path = tmp_path / "corrupt.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return path


# (task, extra arguments built from tmp_path, the flag the error must name)
VALIDATION_CASES: dict[str, tuple[str, Callable[[Path], list], str]] = {
    "frames-not-4n+1": ("tiny-t2v", lambda tmp: ["--frame-num", 8], "--frame-num"),
    "unsupported-size": ("tiny-t2v", lambda tmp: ["--size", "1280*720"], "--size"),
    "steps-zero": ("tiny-t2v", lambda tmp: ["--steps", 0], "--steps"),
    "unknown-solver": ("tiny-t2v", lambda tmp: ["--sample_solver", "heun"], "--solver"),
    "bad-guide-scale": ("tiny-t2v", lambda tmp: ["--guide-scale", "3,4,5"], "--guide-scale"),
    "bad-offload-value": ("tiny-t2v", lambda tmp: ["--offload_model", "maybe"], "--offload_model"),
    "bad-device": ("tiny-t2v", lambda tmp: ["--device", "tpu"], "--device"),
    "output-not-mp4": ("tiny-t2v", lambda tmp: ["--output", tmp / "video.avi"], "--output"),
    "missing-ckpt-dir": ("tiny-t2v", lambda tmp: ["--ckpt-dir", tmp / "no-such-checkpoint"], "--ckpt-dir"),
    "empty-prompt": ("tiny-t2v", lambda tmp: ["--prompt", ""], "--prompt"),
    "seed-too-large": ("tiny-t2v", lambda tmp: ["--seed", 2**64], "--seed"),
    "unknown-task": ("t2v-XL", lambda tmp: [], "--task"),
    # Values click itself rejects get the same one line, not Typer's boxed panel.
    "steps-not-a-number": ("tiny-t2v", lambda tmp: ["--steps", "abc"], "--steps"),
    "unknown-option": ("tiny-t2v", lambda tmp: ["--sampling-steps", 4], "--sampling-steps"),
    "image-for-t2v": ("tiny-t2v", lambda tmp: ["--image", _corrupt_image(tmp)], "--image"),
    "missing-image": ("tiny-i2v", lambda tmp: [], "--image"),
    "image-not-found": ("tiny-i2v", lambda tmp: ["--image", tmp / "nowhere.png"], "--image"),
    "corrupt-image": ("tiny-i2v", lambda tmp: ["--image", _corrupt_image(tmp)], "--image"),
}


@pytest.mark.parametrize("case", VALIDATION_CASES)
def test_invalid_options_exit_2_with_one_line_naming_the_flag(checkpoints, tmp_path, case):
    task, extra, flag = VALIDATION_CASES[case]
    ckpt = checkpoints.get(task, checkpoints["tiny-t2v"])
    # Later options win in click, so `extra` overrides the valid defaults before it.
    result = wanrt("generate", "--task", task, "--ckpt-dir", ckpt, "--prompt", PROMPT,
                   "--output", tmp_path / "video.mp4", *extra(tmp_path))
    message = assert_one_line_error(result, flag)
    if case == "unknown-task":
        assert "tiny-t2v" in message and "ti2v-5B" in message
    assert not list(tmp_path.glob("video*"))


def test_failed_decode_is_finished_by_wanrt_decode(checkpoints, tmp_path, monkeypatch):
    common = ["generate", "--task", "tiny-ti2v", "--ckpt-dir", checkpoints["tiny-ti2v"], "--prompt", PROMPT,
              "--steps", 2, "--seed", 3]
    assert wanrt(*common, "--output", tmp_path / "normal.mp4").exit_code == 0

    real_decode, calls = Pipeline.decode, []

    def decode_failing_once(self, latents):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated VAE out of memory")
        return real_decode(self, latents)
    monkeypatch.setattr(Pipeline, "decode", decode_failing_once)
    failed = wanrt(*common, "--output", tmp_path / "failed.mp4")
    latents_path = tmp_path / "failed.latents.safetensors"
    assert_one_line_error(failed, f"wanrt decode {latents_path}", "simulated VAE out of memory",
                          after_phase_lines=True)
    assert latents_path.is_file()
    assert not (tmp_path / "failed.mp4").exists() and not (tmp_path / "failed.json").exists()

    finished = wanrt("decode", latents_path)
    assert finished.exit_code == 0, finished.output
    assert f"video:   {tmp_path / 'failed.mp4'}" in finished.stdout
    assert torch.equal(read_video(tmp_path / "failed.mp4")[0], read_video(tmp_path / "normal.mp4")[0])
    sidecar = json.loads((tmp_path / "failed.json").read_text())
    assert sidecar["seed"] == 3 and sidecar["decode_run"]["device"] == "cpu"


def test_decode_refuses_a_file_that_is_not_wanrt_latents(tmp_path):
    not_latents = tmp_path / "video.latents.safetensors"
    not_latents.write_bytes(b"garbage")
    assert_one_line_error(wanrt("decode", not_latents), str(not_latents))


def test_demo_writes_a_video_and_reuses_its_checkpoint(tmp_path, cache_dir):
    output = tmp_path / "demo.mp4"
    first = wanrt("demo", "--task", "tiny-ti2v", "--output", output)
    assert first.exit_code == 0, first.output
    assert "random-weight" in first.stdout and f"video:   {output}" in first.stdout
    assert read_video(output)[0].shape[1] == 9
    vae = cache_dir / "demo" / "tiny-ti2v" / get_task("tiny-ti2v").vae_checkpoint
    written_at = vae.stat().st_mtime_ns
    assert wanrt("demo", "--task", "tiny-ti2v", "--output", output).exit_code == 0
    assert vae.stat().st_mtime_ns == written_at


def test_plan_prints_the_split_and_fits():
    result = CliRunner().invoke(app, ["plan", "--task", "t2v-A14B", "--size", "832*480", "--vram", "24",
                                      "--ram", "64"])
    assert result.exit_code == 0, result.output
    assert "stream 18/40 blocks per expert, 22 resident" in result.output
    assert result.output.strip().endswith("fits")


def test_plan_json_and_refusal_with_remedy():
    result = CliRunner().invoke(app, ["plan", "--task", "t2v-A14B", "--size", "1280*720", "--json"])
    assert result.exit_code == 2
    plan = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    assert plan["tokens"] == 75600 and plan["fits"] is False
    assert "error: t2v-A14B 1280*720 x81 does not fit the budget: the VAE decode needs" in result.stderr


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_precision_flag_quantizes_by_the_default_policy_and_reports_it(checkpoints, tmp_path, precision):
    common = ["generate", "--task", "tiny-t2v", "--ckpt-dir", checkpoints["tiny-t2v"], "--prompt", PROMPT,
              "--steps", 3, "--seed", 5, "--no-embedding-cache"]
    full = wanrt(*common, "--output", tmp_path / "full.mp4")
    quantized = wanrt(*common, "--precision", precision, "--output", tmp_path / "q.mp4")
    assert full.exit_code == 0 and quantized.exit_code == 0, quantized.output
    sidecar = json.loads((tmp_path / "q.json").read_text())
    assert sidecar["runtime"]["precision"] == precision
    # The default policy keeps the first and the last block in high precision, which in
    # the two-block tiny model is all of them: reported, and the latents are unchanged.
    # (test_pipeline measures real quantization error on a four-block model.)
    expected = f"{precision}: 0/26 linears quantized, 26 kept fp32 (0 guard, 26 policy)"  # a float32 CPU run
    assert sidecar["runtime"]["quantization"]["high_noise"].startswith(expected)
    assert f"quantized high_noise: {expected}" in quantized.stdout
    reference, latents = (read_latents(tmp_path / f"{n}.latents.safetensors")[0] for n in ("full", "q"))
    assert torch.equal(latents, reference)


def test_quantize_then_generate_with_quantized_experts(checkpoints, tmp_path):
    ckpt = checkpoints["tiny-t2v"]
    result = wanrt("quantize", "--task", "tiny-t2v", "--ckpt-dir", ckpt, "--out", tmp_path / "q", "--scheme", "int8")
    assert result.exit_code == 0, result.output
    assert "high_noise: int8: 0/26 linears quantized" in result.stdout  # 2 blocks: policy keeps both
    generated = wanrt("generate", "--task", "tiny-t2v", "--ckpt-dir", ckpt, "--quantized", tmp_path / "q",
                      "--prompt", PROMPT, "--steps", 2, "--output", tmp_path / "q.mp4")
    assert generated.exit_code == 0, generated.output
    sidecar = json.loads((tmp_path / "q.json").read_text())
    assert sidecar["runtime"]["precision"] == "int8"
    assert sidecar["runtime"]["quantization"]["high_noise"].startswith("int8: 0/26")


def test_quantize_errors_are_one_line(checkpoints, tmp_path):
    missing = wanrt("generate", "--task", "tiny-t2v", "--ckpt-dir", checkpoints["tiny-t2v"], "--prompt", PROMPT,
                    "--quantized", tmp_path / "nowhere", "--output", tmp_path / "x.mp4")
    assert_one_line_error(missing, "--quantized folder not found")
    i2v = wanrt("quantize", "--task", "tiny-i2v", "--ckpt-dir", checkpoints["tiny-i2v"], "--out", tmp_path / "q")
    assert_one_line_error(i2v, "--image")
    assert not (tmp_path / "q").exists()


def test_i2v_quantize_calibrates_on_the_image_conditioned_run(checkpoints, tmp_path):
    """The guard sees what generation feeds the i2v experts (mask + encoded image in `y`),
    and the saved experts generate."""
    image = tmp_path / "first.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    ckpt = checkpoints["tiny-i2v"]
    result = wanrt("quantize", "--task", "tiny-i2v", "--ckpt-dir", ckpt, "--out", tmp_path / "q",
                   "--scheme", "fp8", "--image", image, "--frame-num", 5)
    assert result.exit_code == 0, result.output
    assert "high_noise: fp8:" in result.stdout and "low_noise: fp8:" in result.stdout
    generated = wanrt("generate", "--task", "tiny-i2v", "--ckpt-dir", ckpt, "--quantized", tmp_path / "q",
                      "--image", image, "--prompt", PROMPT, "--steps", 2, "--frame-num", 5,
                      "--output", tmp_path / "q.mp4")
    assert generated.exit_code == 0, generated.output
    assert json.loads((tmp_path / "q.json").read_text())["runtime"]["precision"] == "fp8"
