"""8-bit attention and the fused activation quantizer: the Triton kernels, run on CPU tensors
through Triton's interpreter (conftest.py sets TRITON_INTERPRET=1 where there is no CUDA) or
on the GPU, checked against float64 SDPA and the torch references, and compiled for sm_80/89/90
(kernel_compile_check.py); the attention backends, their guard, a pipeline run and
`wanrt generate --attention sage` on the tiny models; the benchmark script, tiny.

Error budgets (relative L2 vs float64 SDPA), from int8 per-block Q/K (~1% per element on
Gaussian inputs) and fp16 P·V: `SAGE_BUDGET`. Against a torch emulation of the same
quantization the kernel must agree to fp16 rounding: `EMULATION_BUDGET`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES

from wanrt.configs import get_task
from wanrt.errors import ConfigError, InputError
from wanrt.export.quantize import FP8_MAX, INT8_MAX, Scheme, auto_scheme, quantize_rows
from wanrt.kernels import PVPrecision
from wanrt.loading.checkpoint import Expert, load_dit
from wanrt.models.dit import WanDiT, attention
from wanrt.pipelines import GenerationRequest, Pipeline, TextEmbeddings
from wanrt.random_weights import randomize_
from wanrt.runtime.attention import (
    AttentionBackend,
    AttentionGuard,
    attach_attention,
    pick_auto,
    relative_error,
    restore_sdpa,
    sage_pv_precision,
    use_attention,
)

# Without CUDA, conftest.py sets TRITON_INTERPRET=1 before anything imports Triton: the
# kernels then run in Triton's interpreter on CPU tensors.
pytest.importorskip("triton", reason="the 8-bit kernels are written in Triton, which is not installed")
from wanrt.kernels.row_quant import fused_quantize_rows  # noqa: E402
from wanrt.kernels.sage_attention import (  # noqa: E402
    LOG2E,
    attend_quantized_values,
    quantize_per_block,
    quantize_values,
    sage_attention,
    smoothing_mean,
)

# With CUDA the kernels compile and run on the GPU (fp8 P·V too, on SM89+); without, on CPU
# tensors in the interpreter.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FP8_PV_RUNS = DEVICE.type == "cuda" and torch.cuda.get_device_capability() >= (8, 9)
interpreter_only = pytest.mark.skipif(
    DEVICE.type == "cuda", reason="runs the kernels on the CPU, through Triton's interpreter, which a CUDA "
    "test session does not use")

SAGE_BUDGET = 3e-2
# e4m3 P and V (3 mantissa bits): the fp16 twin of the fp8 logic measures 2.4e-2 on the CPU;
# the GPU's own e4m3 rounding of P is not measured here.
FP8_BUDGET = 5e-2
EMULATION_BUDGET = 1e-3
BLOCK = 16  # the tests' query/key tiles: many blocks at small shapes

# (batch, query tokens, key tokens, heads, head_dim, visible keys per batch or None)
SHAPES = [
    (1, 37, 37, 2, 16, None),            # odd token count, one partial block
    (2, 50, 45, 3, 24, (30, 45)),        # padded keys, Lq != Lk, head_dim not a power of two
    (1, 64, 64, 2, 64, (57,)),           # whole blocks, the last keys padded
]


def _inputs(batch, q_len, kv_len, heads, head_dim, visible, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_len, heads, head_dim, generator=generator)
    # K with a shared channel offset, as real keys have: what K smoothing removes.
    k = torch.randn(batch, kv_len, heads, head_dim, generator=generator) + 3 * torch.randn(
        heads, head_dim, generator=generator)
    v = torch.randn(batch, kv_len, heads, head_dim, generator=generator)
    mask = None
    if visible is not None:
        mask = torch.arange(kv_len)[None, :] < torch.tensor(visible)[:, None]
    return tuple(t.to(DEVICE) if t is not None else None for t in (q, k, v, mask))


def _sdpa64(q, k, v, mask):
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :] if mask is not None else None)
    return out.transpose(1, 2)


def _round_half_away(x):
    return torch.trunc(x + 0.5 * torch.sign(x))


def _quantize_blocks_reference(x, block, multiplier=1.0, mean=None, mask=None):
    """float64 dequantized values of the kernel's per-block int8 quantization."""
    x = x.double() * multiplier
    if mean is not None:
        x = x - mean[:, None].double()
    if mask is not None:
        x = x * mask[:, :, None, None]
    out = torch.empty_like(x)
    for start in range(0, x.shape[1], block):
        chunk = x[:, start:start + block]
        scale = chunk.abs().amax(dim=(1, 3), keepdim=True).float().clamp_min(1e-12).double() / INT8_MAX
        out[:, start:start + block] = _round_half_away((chunk.float() / scale.float()).double()) * scale
    return out


def _emulated_sage(q, k, v, mask):
    """The kernel's arithmetic in float64: quantized Q and K, exact softmax and P·V."""
    head_dim = q.shape[-1]
    qd = _quantize_blocks_reference(q, BLOCK, LOG2E / math.sqrt(head_dim))
    kd = _quantize_blocks_reference(k, BLOCK, mean=smoothing_mean(k, mask), mask=mask)
    scores = torch.einsum("bqhd,bkhd->bhqk", qd, kd) * math.log(2)  # back to base e
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + ("-masked" if s[5] else ""))
def test_sage_kernel_within_budget_of_float64_sdpa(shape):
    q, k, v, mask = _inputs(*shape)
    expected = _sdpa64(q, k, v, mask)
    assert relative_error(attention(q, k, v, mask), expected) <= 1e-6  # the sdpa backend, float32
    out = sage_attention(q, k, v, mask, block_m=BLOCK, block_n=BLOCK)
    assert out.shape == q.shape and out.dtype == v.dtype
    assert relative_error(out, expected) <= SAGE_BUDGET
    # The error is the quantization's, nothing else: the kernel equals its emulation.
    assert relative_error(out, _emulated_sage(q, k, v, mask)) <= EMULATION_BUDGET
    if FP8_PV_RUNS:
        assert relative_error(sage_attention(q, k, v, mask, "fp8", BLOCK, BLOCK), expected) <= FP8_BUDGET


def test_sage_kernel_takes_strided_bf16_inputs_and_ignores_padded_keys():
    q, k, v, mask = _inputs(1, 40, 40, 2, 16, (33,))
    # The DiT hands [B, L, N, D] views of [B, L, N*D] projections; here transposed storage.
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    garbage = k.clone()
    garbage[:, 33:] = 1e4  # padded keys must change nothing (scores, K mean, K block scales)
    out = sage_attention(q, garbage, v.bfloat16(), mask, block_m=BLOCK, block_n=BLOCK)
    assert out.dtype == torch.bfloat16
    clean = sage_attention(q, k, v.bfloat16(), mask, block_m=BLOCK, block_n=BLOCK)
    assert torch.equal(out, clean)
    assert relative_error(out, _sdpa64(q, k, v, mask)) <= SAGE_BUDGET


def test_fp8_pv_logic_through_its_fp16_twin():
    """The fp8 variant's V per-channel scales and P x 448 run with e4m3-rounded V held in
    fp16 (the interpreter's own float8 casts are wrong); only P's e4m3 rounding is left to
    the GPU."""
    q, k, v, mask = _inputs(2, 50, 45, 3, 24, (30, 45))
    values, scales, p_scale = quantize_values(v, PVPrecision.FP8, mask)
    assert values.dtype == torch.float8_e4m3fn and values.stride(1) == 1 and p_scale == FP8_MAX
    # The fp16 copy keeps the token-contiguous strides (preserve_format), as the GPU reads them.
    twin = values.to(torch.float16)
    assert twin.stride() == values.stride()
    out = attend_quantized_values(q, k, twin, scales, p_scale, mask, BLOCK, BLOCK, torch.float32)
    assert relative_error(out, _sdpa64(q, k, v, mask)) <= SAGE_BUDGET
    fp16 = sage_attention(q, k, v, mask, block_m=BLOCK, block_n=BLOCK)
    assert relative_error(out, fp16) <= 5e-2  # e4m3 V: 3 mantissa bits, ~2-3% per value


def test_per_block_quantization_matches_the_reference():
    q, k, _, mask = _inputs(2, 45, 45, 3, 24, (30, 45))
    mean = smoothing_mean(k, mask)
    values, scales = quantize_per_block(k, BLOCK, mean=mean, key_mask=mask.to(torch.int8))
    assert values.shape == (2, 3, 48, 32) and scales.shape == (2, 3, 3)
    dequantized = (values.float().unflatten(2, (3, BLOCK)) * scales[..., None, None]).flatten(2, 3)
    expected = _quantize_blocks_reference(k, BLOCK, mean=mean, mask=mask).transpose(1, 2)
    assert torch.allclose(dequantized[:, :, :45, :24].double(), expected, atol=1e-6)
    assert not values[:, :, 45:].any() and not values[..., 24:].any() and not values[0, :, 30:45].any()


def test_fused_row_quantization_equals_the_torch_reference():
    x = torch.randn(9, 2100, device=DEVICE) * 3
    x[3] = 0  # an all-zero row (padding tokens): zeros, not 0/0
    x[5, 7] = 100.0
    for dtype in (torch.float32, torch.bfloat16):
        values, scales = fused_quantize_rows(x.to(dtype), INT8_MAX, torch.int8)
        expected_values, expected_scales = quantize_rows(x.to(dtype), INT8_MAX, torch.int8)
        assert torch.equal(values, expected_values) and torch.equal(scales, expected_scales)
    # fp8: the same scaling and clamp; the e4m3 cast itself is the GPU's (checked there).
    values, scales = fused_quantize_rows(x, FP8_MAX, torch.float32)
    _, expected_scales = quantize_rows(x, FP8_MAX, torch.float8_e4m3fn)
    assert torch.equal(scales, expected_scales)
    assert torch.equal(values, (x / expected_scales).clamp(-FP8_MAX, FP8_MAX))
    if DEVICE.type == "cuda":  # the real e4m3 cast rounds as torch's
        values, _ = fused_quantize_rows(x, FP8_MAX, torch.float8_e4m3fn)
        assert torch.equal(values.float(), quantize_rows(x, FP8_MAX, torch.float8_e4m3fn)[0].float())


def test_auto_precision_per_arch():
    assert auto_scheme(None) is Scheme.BF16
    assert auto_scheme((7, 5)) is Scheme.BF16
    assert auto_scheme((8, 0)) is Scheme.INT8
    assert auto_scheme((8, 9)) is Scheme.INT8
    assert auto_scheme((9, 0)) is Scheme.FP8
    assert auto_scheme((10, 0)) is Scheme.FP8


# ------------------------------------------------------------------ backends and guard


def _tiny_dit(layers: int = 4) -> WanDiT:
    config = get_task("tiny-t2v").dit
    return randomize_(WanDiT(dataclasses.replace(config, num_layers=layers)), seed=1, device=DEVICE).eval()


def _dit_inputs(model: WanDiT):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(1, model.config.in_dim, 2, 6, 10, generator=generator)  # 2*3*5 = 30 tokens
    context = torch.randn(1, 7, model.config.text_dim, generator=generator)
    inputs = dict(x=x, timestep=torch.tensor([500]), context=context)
    return {**{name: t.to(DEVICE) for name, t in inputs.items()}, "seq_len": 32}  # 2 padded tokens


def test_tokens_are_contiguous_after_patch_embedding():
    model = _tiny_dit(layers=1)
    for seq_len in (30, 32):  # unpadded (the transposed view before issue 15) and padded
        inputs = {**_dit_inputs(model), "seq_len": seq_len}
        assert model.embed(**inputs).tokens.is_contiguous()


def test_sage_backend_within_budget_and_restore_is_exact():
    model = _tiny_dit()
    inputs = _dit_inputs(model)
    with torch.no_grad():
        expected = model(**inputs)
        report = use_attention(model, "sage", guard=None)
        assert report.backend is AttentionBackend.SAGE and all(block.eight_bit for block in report.blocks)
        eight_bit = model(**inputs)
        restore_sdpa(model)
        assert torch.equal(model(**inputs), expected)
    assert relative_error(eight_bit, expected) <= SAGE_BUDGET


def test_guard_keeps_first_last_and_a_damaged_block_on_sdpa():
    model = _tiny_dit()
    # Damage block 2: huge logits make softmax nearly one-hot, where int8 Q/K flip the winners.
    with torch.no_grad():
        model.blocks[2].self_attn.norm_q.weight.mul_(300.0)
    inputs = _dit_inputs(model)
    with torch.no_grad():
        expected = model(**inputs)
        report = use_attention(model, "sage", guard=AttentionGuard(threshold=0.05))
        first = model(**inputs)
    assert torch.equal(first, expected)  # the deciding call returns SDPA's outputs
    decisions = [(block.eight_bit, block.reason.split(":")[0]) for block in report.blocks]
    assert decisions[0] == (False, "one of the first 1 block(s)")
    assert decisions[3] == (False, "one of the last 1 block(s)")
    assert decisions[1][0] is True and report.blocks[1].rel_error <= 0.05
    assert decisions[2] == (False, "guard") and report.blocks[2].rel_error > 0.05
    assert "1/4 blocks 8-bit, 3 sdpa (1 guard, 2 policy)" in report.summary()


def test_non_finite_8bit_output_falls_back_to_sdpa_for_good():
    model = _tiny_dit(layers=2)
    inputs = _dit_inputs(model)
    with torch.no_grad():
        expected = model(**inputs)
        report = use_attention(model, "sage", guard=None)
        kernel = model.blocks[1].self_attn.attention_kernel
        kernel.kernel = lambda q, k, v, mask: torch.full_like(v, float("nan"))  # a broken kernel
        out = model(**inputs)
    assert torch.isfinite(out).all()
    assert report.blocks[1].eight_bit is False and "non-finite" in report.blocks[1].reason
    assert report.blocks[0].eight_bit is True
    assert relative_error(out, expected) <= SAGE_BUDGET


def test_backend_choice_on_cpu(monkeypatch):
    model = _tiny_dit(layers=2)
    cpu = torch.device("cpu")
    # Switching back to sdpa removes the 8-bit kernels: the class's SDPA runs again.
    use_attention(model, "sage", guard=None)
    assert use_attention(model, "auto", device=cpu).backend is AttentionBackend.SDPA
    assert all("attention_kernel" not in vars(block.self_attn) for block in model.blocks)
    with pytest.raises(InputError, match="--attention 'flash' is unknown"):
        use_attention(model, "flash")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="runs on a CUDA GPU, not cpu"):
        use_attention(model, "sage", device=cpu)


@pytest.mark.parametrize("capability, backend, pv", [((7, 5), "sdpa", "fp16"), ((8, 6), "sage", "fp16"),
                                                     ((8, 9), "sage", "fp8"), ((9, 0), "sage", "fp8")])
def test_auto_attention_per_gpu_arch(monkeypatch, capability, backend, pv):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = torch.device("cuda")
    assert pick_auto(cuda)[0].value == backend
    assert sage_pv_precision(cuda).value == pv


def test_pipeline_with_sage_attention_within_budget_of_sdpa():
    """A whole tiny t2v run (both experts, CFG, 3 steps) through the interpreter."""
    task = get_task("tiny-t2v")
    task = dataclasses.replace(task, dit=dataclasses.replace(task.dit, text_dim=4096))
    generator = torch.Generator().manual_seed(5)
    embeddings = TextEmbeddings(torch.randn(7, 4096, generator=generator), torch.randn(11, 4096, generator=generator))
    request = GenerationRequest(prompt="", size="64*64", frame_num=1, steps=3, seed=3)

    def run(backend):
        experts = {expert: load_dit(FIXTURES / "dit/t2v" / f"{expert.value}_model")
                   for expert in (Expert.HIGH_NOISE, Expert.LOW_NOISE)}
        pipeline = Pipeline.from_models(task, experts, device=DEVICE)
        decided = []
        record = attach_attention(pipeline, backend, AttentionGuard(keep_first_blocks=0, keep_last_blocks=0),
                                  on_decided=lambda expert, report: decided.append(expert))
        return pipeline.sample(request, embeddings=embeddings), record, decided

    expected, sdpa_record, _ = run("sdpa")
    assert sdpa_record == {expert: {"backend": "sdpa", "kernel": "torch SDPA", "reason": "requested",
                                    "summary": "sdpa (requested)"} for expert in ("high_noise", "low_noise")}
    latents, record, decided = run("sage")
    assert sorted(decided) == ["high_noise", "low_noise"]
    assert all(block["eight_bit"] for report in record.values() for block in report["blocks"])
    assert relative_error(latents, expected) <= SAGE_BUDGET


@interpreter_only
def test_generate_records_the_attention_decisions(checkpoints, tmp_path, cache_dir, monkeypatch):
    from test_cli import PROMPT, assert_one_line_error, wanrt

    common = ["generate", "--task", "tiny-t2v", "--ckpt-dir", checkpoints["tiny-t2v"], "--prompt", PROMPT,
              "--frame-num", 1, "--steps", 2, "--seed", 1, "--attention", "sage"]
    result = wanrt(*common, "--output", tmp_path / "sage.mp4")
    assert result.exit_code == 0, result.output
    # The tiny DiT has two blocks: the guard's default keeps the first and the last.
    line = "sage (int8 QK, fp16 PV; requested): 0/2 blocks 8-bit, 2 sdpa (0 guard, 2 policy)"
    assert f"attention high_noise: {line}" in result.stderr  # 2 steps of shift 12: both high-noise
    recorded = json.loads((tmp_path / "sage.json").read_text())["options"]["attention"]
    assert list(recorded) == ["high_noise"] and recorded["high_noise"]["summary"] == line
    assert [block["reason"] for block in recorded["high_noise"]["blocks"]] == [
        "one of the first 1 block(s)", "one of the last 1 block(s)"]

    assert_one_line_error(wanrt(*common, "--engine", "compile"), "--attention sage runs with --engine eager")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert_one_line_error(wanrt(*common), "--attention sage runs on a CUDA GPU, not cpu")


@interpreter_only
def test_attention_bench_runs_tiny(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from attention_bench import main, sweep_variants

    report = main(["--tiny", "--iters", "1", "--warmup", "0", "--out", str(tmp_path / "attention.json")])
    assert json.loads((tmp_path / "attention.json").read_text()) == report
    attention_rows = {row["kernel"]: row for row in report["attention_results"]}
    assert set(attention_rows) == {"sdpa-bf16", "sage-int8qk-fp16pv"}  # fp8 P·V needs SM89+
    sdpa = attention_rows["sdpa-bf16"]
    assert sdpa["rel_l2_vs_bf16"] == 0 and sdpa["speedup_vs_bf16_sdpa"] == 1
    assert 0 < attention_rows["sage-int8qk-fp16pv"]["rel_l2_vs_bf16"] <= SAGE_BUDGET
    blocks = [(row["linears"], row["attention"]) for row in report["block_results"]]
    assert blocks == [("bf16", "sdpa-bf16"), ("bf16", "sage-int8qk-fp16pv"), ("fp8", "sage-int8qk-fp16pv"),
                      ("int8", "sage-int8qk-fp16pv")]
    assert all(0 < row["rel_l2_vs_bf16"] <= 0.05 for row in report["block_results"][1:])
    assert all(row["seconds_median"] > 0 and row["achieved_tflops"] > 0 for row in report["block_results"])
    # --sweep (GPU only): the fp8 kernel's tiles and pipeline depths on an H100.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert list(sweep_variants(torch.device("cuda"))) == [
        f"sage-int8qk-fp8pv bn{block_n} s{stages} w8" for block_n in (64, 128) for stages in (2, 3, 4)]


def test_kernels_compile_to_8bit_tensor_core_instructions():
    """The interpreter checks numbers, not that the kernels compile: compile them for sm_80,
    sm_89 and sm_90 on this machine (Triton ships LLVM and ptxas) and read the PTX."""
    script = Path(__file__).parent / "kernel_compile_check.py"
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, without its warning
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    int8_mma, hopper_int8 = "mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32", "wgmma.mma_async.sync.aligned"
    assert report["attention sm80 fp16"]["mma"] == ["mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32", int8_mma]
    assert report["attention sm89 fp8e4nv"]["mma"] == ["mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32", int8_mma]
    hopper = report["attention sm90 fp8e4nv"]["mma"]
    assert len(hopper) == 2 and all(op.startswith(hopper_int8) for op in hopper)
    assert hopper[0].endswith(".f32.e4m3.e4m3") and hopper[1].endswith(".s32.s8.s8")  # P·V fp8, QK^T int8
    assert all(report[name]["cubin_bytes"] > 0 for name in
               ("quantize_blocks sm90", "quantize_rows sm90 i8", "quantize_rows sm90 fp8e4nv"))
