"""`--precision auto`: the pure resolution per GPU architecture, `wanrt generate` on the CPU
(bf16, recorded beside what was asked), with `--quantized`, `wanrt plan --arch`, and the
one-line errors. Composition with 8-bit single-file DiTs: test_single_file.py."""

from __future__ import annotations

import json

import pytest
import torch

from test_cli import PROMPT, assert_one_line_error, wanrt
from wanrt.errors import InputError
from wanrt.export.quantize import arch_capability, resolve_precision
from wanrt.generate import read_latents
from wanrt.runtime.planner import Precision

pytestmark = pytest.mark.usefixtures("cache_dir")


@pytest.mark.parametrize("arch, expected", [
    ("cpu", Precision.BF16), ("sm_75", Precision.BF16), ("sm_80", Precision.INT8), ("sm_86", Precision.INT8),
    ("sm_89", Precision.INT8), ("sm_90", Precision.FP8), ("sm_100", Precision.FP8), ("sm_120", Precision.FP8)])
def test_auto_resolves_per_architecture(arch, expected):
    assert resolve_precision("auto", arch) is expected


def test_named_precisions_pass_through_and_bad_values_are_refused():
    assert arch_capability("sm_100") == (10, 0) and arch_capability("sm_89") == (8, 9)
    assert arch_capability("cpu") is None
    for name in ("bf16", "fp8", "int8"):
        assert resolve_precision(name, None) is resolve_precision(name, "sm_90") is Precision(name)
    with pytest.raises(InputError, match="--precision auto picks by GPU architecture and there is no GPU"):
        resolve_precision("auto", None)
    for arch in ("h100", "sm_", "sm_9", "sm_9x", "89"):
        with pytest.raises(InputError, match=f"--arch '{arch}' is not a GPU architecture"):
            resolve_precision("auto", arch)
    with pytest.raises(InputError, match="--precision 'fp4' is unknown; choose one of bf16, fp8, int8, auto"):
        resolve_precision("fp4", "sm_90")


def _generate(checkpoints, tmp_path, name: str, *extra: object):
    result = wanrt("generate", "--task", "tiny-t2v", "--ckpt-dir", checkpoints["tiny-t2v"], "--prompt", PROMPT,
                   "--steps", 2, "--seed", 3, "--frame-num", 5, "--device", "cpu", "--no-embedding-cache",
                   "--output", tmp_path / f"{name}.mp4", *extra)
    assert result.exit_code == 0, result.output
    return result, json.loads((tmp_path / f"{name}.json").read_text())


def test_generate_auto_on_the_cpu_runs_bf16_and_records_both(checkpoints, tmp_path):
    result, sidecar = _generate(checkpoints, tmp_path, "auto", "--precision", "auto")
    assert result.stderr.count("precision auto:") == 1
    assert "precision auto: bf16 (cpu)" in result.stderr
    # Not quantized: the weights keep the compute dtype, float32 on the CPU.
    assert sidecar["runtime"]["precision"] == "fp32" and sidecar["runtime"]["quantization"] == {}
    assert sidecar["runtime"]["precision_requested"] == "auto"
    named, named_sidecar = _generate(checkpoints, tmp_path, "bf16")
    assert "precision auto" not in named.stderr
    assert named_sidecar["runtime"]["precision_requested"] == "bf16"
    latents = [read_latents(tmp_path / f"{name}.latents.safetensors")[0] for name in ("auto", "bf16")]
    assert torch.equal(*latents)


def test_auto_takes_the_quantized_folders_precision(checkpoints, tmp_path):
    quantized = wanrt("quantize", "--task", "tiny-t2v", "--ckpt-dir", checkpoints["tiny-t2v"],
                      "--out", tmp_path / "q", "--scheme", "int8")
    assert quantized.exit_code == 0, quantized.output
    result, sidecar = _generate(checkpoints, tmp_path, "q", "--precision", "auto", "--quantized", tmp_path / "q")
    assert "precision auto: int8 (as the --quantized folder stores it)" in result.stderr
    assert (sidecar["runtime"]["precision"], sidecar["runtime"]["precision_requested"]) == ("int8", "auto")
    named = wanrt("generate", "--task", "tiny-t2v", "--ckpt-dir", checkpoints["tiny-t2v"], "--prompt", PROMPT,
                  "--precision", "fp8", "--quantized", tmp_path / "q", "--output", tmp_path / "x.mp4")
    assert_one_line_error(named, "cannot be combined with --quantized")


@pytest.mark.parametrize("arch, expected", [("sm_89", "int8"), ("sm_90", "fp8"), ("sm_75", "bf16")])
def test_plan_auto_for_an_architecture(arch, expected):
    result = wanrt("plan", "--task", "ti2v-5B", "--precision", "auto", "--arch", arch, "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == f"precision auto: {expected} ({arch})"
    named = wanrt("plan", "--task", "ti2v-5B", "--precision", expected, "--json")
    assert json.loads(result.stdout) == json.loads(named.stdout)


def test_plan_and_generate_refuse_bad_values_in_one_line(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_one_line_error(wanrt("plan", "--precision", "auto"), "--precision auto", "give --arch")
    assert_one_line_error(wanrt("plan", "--precision", "auto", "--arch", "ada"), "--arch 'ada'")
    assert_one_line_error(wanrt("plan", "--precision", "fp8", "--arch", "sm_90"), "--arch only")
    for command in (["plan"], ["generate", "--task", "tiny-t2v", "--ckpt-dir", checkpoints["tiny-t2v"],
                               "--prompt", PROMPT, "--output", tmp_path / "x.mp4"]):
        assert_one_line_error(wanrt(*command, "--precision", "fp4"), "--precision")


def test_preview_takes_auto(checkpoints, tmp_path):
    result = wanrt("preview", "--task", "tiny-t2v", "--ckpt-dir", checkpoints["tiny-t2v"], "--prompt", PROMPT,
                   "--count", 1, "--steps", 2, "--frame-num", 5, "--device", "cpu", "--precision", "auto",
                   "--no-embedding-cache", "--out", tmp_path / "p")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("precision auto: bf16 (cpu)") == 1
