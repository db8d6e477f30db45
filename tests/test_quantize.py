"""FP8 / INT8 / weight-only quantization of the DiT: error budgets, policy, fidelity guard,
kernel equivalence and the quantized checkpoint round trip.

Error budgets (relative L2, measured on torch 2.13 CPU, budget = measured + ~40% margin):

| scheme, path                      | one Linear 512->256, Gaussian x | whole t2v fixture DiT |
|-----------------------------------|---------------------------------|-----------------------|
| fp8 weight-only (dequant, CPU)    | 2.5e-2 -> 3.5e-2                | 1.4e-2 -> 2.2e-2      |
| fp8 W8A8 (per-token e4m3)         | 3.7e-2 -> 5e-2                  | 2.1e-2 -> 3e-2        |
| int8 W8A8 (_int_mm)               | 8.4e-3 -> 1.2e-2                | 5.5e-3 -> 8e-3        |
| int8-wo (quanto qint8)            | 3.9e-3 -> 6e-3                  | 3.6e-3 -> 5.5e-3      |
| int4-wo (quanto qint4)            | 6.4e-2 -> 9e-2                  | 5.9e-2 -> 8.5e-2      |

The whole-DiT figures quantize every block Linear (no first/last block kept) and compare
with the same model unquantized, in float32, on the g1 fixture inputs (|out| max 4.03).
"""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch
from conftest import FIXTURES, load_fixture
from torch import nn

from wanrt.configs import get_task
from wanrt.errors import CheckpointError, ConfigError
from wanrt.export import quantize as quantize_module
from wanrt.export.quant_guard import RowSample, calibrate_and_guard
from wanrt.export.quant_io import (
    MANIFEST_NAME,
    load_quantized,
    save_quantized,
    source_weights_sha256,
)
from wanrt.export.quantize import (
    Float8Linear,
    Int8Linear,
    Kernel,
    PrecisionPolicy,
    QuantReport,
    Scheme,
    _probe_scaled_mm,
    pin_kernel,
    quantize,
    quantize_text_encoder,
    quanto_linear,
)
from wanrt.loading.checkpoint import load_dit
from wanrt.models.dit import WanDiT
from wanrt.random_weights import randomize_

T2V_HIGH = FIXTURES / "dit/t2v/high_noise_model"
ALL_BLOCKS = PrecisionPolicy(keep_first_blocks=0, keep_last_blocks=0)
QUANTO_SCHEMES = (Scheme.INT8_WO, Scheme.INT4_WO)


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def needs_quanto(scheme: Scheme) -> None:
    if scheme in QUANTO_SCHEMES:
        pytest.importorskip("optimum.quanto", reason="optimum-quanto (extra 'quant') is not installed")


@pytest.fixture(scope="module")
def fixture_inputs() -> dict[str, torch.Tensor]:
    tensors, _ = load_fixture("dit/forward_t2v")
    return {"x": tensors["g1.x"][None], "timestep": tensors["t_scalar"], "context": tensors["context"][None]}


@pytest.fixture(scope="module")
def reference_out(fixture_inputs) -> torch.Tensor:
    with torch.no_grad():
        return load_dit(T2V_HIGH)(**fixture_inputs)


def tiny_dit(num_layers: int = 4) -> WanDiT:
    config = dataclasses.replace(get_task("tiny-t2v").dit, num_layers=num_layers)
    with torch.device("meta"):
        model = WanDiT(config)
    return randomize_(model, seed=0).eval()


# --- error budgets -------------------------------------------------------------------------

LINEAR_CASES = [
    # (id, scheme, build the quantized layer from a Linear, budget)
    ("fp8-dequant", Scheme.FP8, lambda lin: Float8Linear.from_linear(lin, Kernel.DEQUANT), 3.5e-2),
    ("fp8-w8a8", Scheme.FP8, lambda lin: Float8Linear.from_linear(lin, Kernel.EMULATED), 5e-2),
    ("int8-w8a8", Scheme.INT8, lambda lin: Int8Linear.from_linear(lin, Kernel.INT_MM), 1.2e-2),
    ("int8-wo", Scheme.INT8_WO, lambda lin: quanto_linear("qint8", lin), 6e-3),
    ("int4-wo", Scheme.INT4_WO, lambda lin: quanto_linear("qint4", lin), 9e-2),
]


@pytest.mark.parametrize("scheme,build,budget", [pytest.param(*case[1:], id=case[0]) for case in LINEAR_CASES])
def test_linear_error_within_budget(scheme, build, budget):
    needs_quanto(scheme)
    linear = nn.Linear(512, 256)
    x = torch.randn(4, 32, 512)
    with torch.no_grad():
        error = rel_l2(build(linear)(x), linear(x))
    # The lower bound proves the layer really was quantized.
    assert budget / 20 < error <= budget, f"rel err {error:.3g} (budget {budget:.1g})"


def needs_cpu_rowwise_scaled_mm() -> None:
    """Older torch (2.11) CPU builds only take per-tensor scales in `_scaled_mm`."""
    try:
        _probe_scaled_mm(torch.device("cpu"))
    except RuntimeError:
        pytest.skip(f"torch {torch.__version__}'s CPU _scaled_mm has no rowwise scales; "
                    "the CUDA comparison covers the path")


@pytest.mark.parametrize("scheme,kernel,budget", [
    (Scheme.FP8, None, 2.2e-2),              # the CPU path: dequant
    (Scheme.FP8, Kernel.SCALED_MM, 3e-2),    # the W8A8 GPU arithmetic, run by torch's CPU _scaled_mm
    (Scheme.INT8, None, 8e-3),               # _int_mm on CPU
    (Scheme.INT8_WO, None, 5.5e-3),
    (Scheme.INT4_WO, None, 8.5e-2),
])
def test_whole_dit_error_within_budget(scheme, kernel, budget, fixture_inputs, reference_out):
    needs_quanto(scheme)
    if kernel is Kernel.SCALED_MM:
        needs_cpu_rowwise_scaled_mm()
    model = pin_kernel(quantize(load_dit(T2V_HIGH), scheme, ALL_BLOCKS), kernel)
    with torch.no_grad():
        out = model(**fixture_inputs)
    error = rel_l2(out, reference_out)
    assert budget / 20 < error <= budget, f"{scheme.value}: rel err {error:.3g} (budget {budget:.1g})"
    assert model.quant_report.summary().startswith(f"{scheme.value}: 20/26 linears quantized")


def test_bf16_scheme_is_a_no_op(fixture_inputs, reference_out):
    model = load_dit(T2V_HIGH)
    modules_before = dict(model.named_modules())
    assert quantize(model, "bf16") is model
    assert dict(model.named_modules()) == modules_before
    assert not hasattr(model, "quant_report")
    with torch.no_grad():
        assert torch.equal(model(**fixture_inputs), reference_out)


def test_quantized_dit_under_autocast(fixture_inputs, reference_out):
    model = quantize(load_dit(T2V_HIGH), "fp8", ALL_BLOCKS)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**fixture_inputs)
    assert out.dtype == torch.float32  # the head runs in float32, as unquantized
    # fp8 weights plus bf16 compute: same budget as float32 compute, bf16 adds ~1e-3.
    assert rel_l2(out, reference_out) <= 2.2e-2


# --- precision policy -------------------------------------------------------------------------

def test_policy_keeps_embeddings_head_and_first_last_blocks():
    model = quantize(tiny_dit(num_layers=4), "fp8")
    kept = {"text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
            "time_projection.1", "head.head"}
    kept |= {f"blocks.{i}.{leaf}" for i in (0, 3) for leaf in (
        "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
        "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")}
    linear_like = {name: type(m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, Float8Linear))}
    assert {name for name, kind in linear_like.items() if kind is nn.Linear} == kept
    assert sum(kind is Float8Linear for kind in linear_like.values()) == 20  # blocks 1 and 2
    assert type(model.patch_embedding) is nn.Conv3d
    assert all(block.modulation.dtype == torch.float32 for block in model.blocks)
    reasons = {layer.name: layer.reason for layer in model.quant_report.layers}
    assert reasons["blocks.0.ffn.0"] == "one of the first 1 block(s)"
    assert reasons["blocks.3.ffn.0"] == "one of the last 1 block(s)"
    assert reasons["head.head"] == "the model keeps it in float32 (keep_in_fp32)"


def test_policy_patterns_override_defaults():
    policy = PrecisionPolicy(keep=("blocks.*.cross_attn.*", "blocks.2.ffn.2"),
                             quantize=("blocks.0.ffn.*", "text_embedding.0", "blocks.2.ffn.*", "head.*"))
    model = quantize(tiny_dit(num_layers=4), "int8", policy)
    kinds = {name: type(m) for name, m in model.named_modules()}
    assert kinds["blocks.0.ffn.0"] is Int8Linear and kinds["blocks.0.ffn.2"] is Int8Linear
    assert kinds["text_embedding.0"] is Int8Linear and kinds["text_embedding.2"] is nn.Linear
    assert kinds["blocks.1.cross_attn.q"] is nn.Linear and kinds["blocks.1.self_attn.q"] is Int8Linear
    assert kinds["blocks.2.ffn.2"] is nn.Linear  # keep wins over quantize
    assert kinds["head.head"] is nn.Linear       # keep_in_fp32 wins over any pattern
    reasons = {layer.name: layer.reason for layer in model.quant_report.layers}
    assert reasons["blocks.1.cross_attn.q"] == "policy keep pattern 'blocks.*.cross_attn.*'"
    assert reasons["blocks.0.ffn.0"] == "policy quantize pattern 'blocks.0.ffn.*'"


def test_policy_and_scheme_errors():
    with pytest.raises(ConfigError, match="matches no Linear"):
        quantize(tiny_dit(), "fp8", PrecisionPolicy(keep=("blocks.*.atn.q",)))
    with pytest.raises(ConfigError, match="quantization scheme 'fp4' is unknown"):
        quantize(tiny_dit(), "fp4")
    with pytest.raises(ConfigError, match=">= 0"):
        PrecisionPolicy(keep_first_blocks=-1)
    model = quantize(tiny_dit(), "fp8")
    with pytest.raises(ConfigError, match=r"already quantized \(fp8\)"):
        quantize(model, "int8")
    with pytest.raises(ConfigError, match="unknown precision policy keys"):
        PrecisionPolicy.from_dict({"keep_first": 1})


def test_missing_optional_backends_give_clear_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "optimum.quanto.nn", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    quantize_module._quanto_linear_class.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"int8-wo and int4-wo need optimum-quanto: pip install 'wanrt\[quant\]'"):
            quantize(tiny_dit(), "int4-wo")
        with pytest.raises(ConfigError, match="8-bit T5 needs bitsandbytes"):
            quantize_text_encoder(nn.Sequential(nn.Linear(8, 8)))
    finally:
        quantize_module._quanto_linear_class.cache_clear()


# --- fidelity guard -------------------------------------------------------------------------

def damage_ffn_input(model: WanDiT, channel: int = 5) -> None:
    """Give blocks.0.ffn.2 a massive input channel that its weights ignore.

    ffn.0's bias makes hidden channel `channel` 1e6 for every token (GELU(1e6) = 1e6) and
    ffn.2's weight column for it is zeroed, so the outlier never reaches the output. A
    per-token activation scale then sees amax 1e6 and flushes every other channel of
    ffn.2's input to zero: that layer's W8A8 error is ~100%, the others' are untouched.
    """
    with torch.no_grad():
        model.blocks[0].ffn[0].bias[channel] = 1e6
        model.blocks[0].ffn[2].weight[:, channel] = 0


@pytest.mark.parametrize("scheme", [Scheme.FP8, Scheme.INT8])
def test_guard_keeps_a_damaged_layer(scheme, fixture_inputs):
    model = load_dit(T2V_HIGH)
    damage_ffn_input(model)
    with torch.no_grad():
        reference_out = model(**fixture_inputs)

    report = calibrate_and_guard(model, [fixture_inputs], scheme, ALL_BLOCKS)
    layers = {layer.name: layer for layer in report.layers}
    damaged = layers["blocks.0.ffn.2"]
    assert not damaged.quantized and damaged.scheme == "bf16"
    assert damaged.rel_error > 0.5 and damaged.reason.startswith("guard: rel err")
    assert type(model.blocks[0].ffn[2]) is nn.Linear
    others = [layer for name, layer in layers.items() if name.startswith("blocks.") and name != "blocks.0.ffn.2"]
    assert len(others) == 19 and all(layer.quantized for layer in others)
    assert max(layer.rel_error for layer in others) < report.threshold
    assert report.summary().startswith(f"{scheme.value}: 19/26 linears quantized, 7 kept fp32 (1 guard, 6 policy)")

    # With the W8A8 arithmetic (what a GPU runs), the damaged layer wrecks the unguarded
    # output; the guarded one stays within the whole-DiT budget.
    pin_kernel(model, Kernel.EMULATED)
    unguarded = load_dit(T2V_HIGH)
    damage_ffn_input(unguarded)
    pin_kernel(quantize(unguarded, scheme, ALL_BLOCKS), Kernel.EMULATED)
    with torch.no_grad():
        guarded_error = rel_l2(model(**fixture_inputs), reference_out)
        unguarded_error = rel_l2(unguarded(**fixture_inputs), reference_out)
    assert guarded_error <= 3e-2 < unguarded_error

    assert QuantReport.from_json(report.to_json()) == report
    assert json.loads(report.to_json())["layers"][0]["name"] == "text_embedding.0"


def test_guard_row_sample_is_capped_and_drawn_from_the_inputs():
    sample = RowSample(cap=8, generator=torch.Generator().manual_seed(0))
    batches = [torch.randn(2, 5, 4) for _ in range(3)]
    for batch in batches:
        sample(None, (batch,))
    seen = torch.cat([b.reshape(-1, 4) for b in batches])
    assert sample.rows.shape == (8, 4)
    assert all((seen == row).all(dim=1).any() for row in sample.rows)
    assert len({tuple(row.tolist()) for row in sample.rows}) == 8  # without replacement


def test_guard_refuses_bf16_and_unreached_layers(fixture_inputs):
    with pytest.raises(ConfigError, match="nothing to guard"):
        calibrate_and_guard(load_dit(T2V_HIGH), [fixture_inputs], "bf16")
    with pytest.raises(ConfigError, match="never reached"):
        calibrate_and_guard(load_dit(T2V_HIGH), [], "fp8", ALL_BLOCKS)


# --- kernels ---------------------------------------------------------------------------------

def _bitwise(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def in_fresh_memory(model: nn.Module) -> nn.Module:
    """Copy every plain tensor to new storage. CPU float32 GEMMs round differently with the
    storage alignment, and tensors read from safetensors keep their arbitrary file offsets,
    so outputs are compared only once both models' tensors are freshly allocated. (quanto's
    tensor subclasses cannot be copied this way; their matmuls dequantize first anyway.)"""
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for tensor in tensors.values():
                if type(tensor) in (torch.Tensor, nn.Parameter):
                    tensor.data = tensor.data.clone()
    return model


def same_outputs(model_a: nn.Module, model_b: nn.Module, inputs: dict) -> bool:
    with torch.no_grad():
        return torch.equal(in_fresh_memory(model_a)(**inputs), in_fresh_memory(model_b)(**inputs))


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_scaled_mm_path_equals_w8a8_emulation_and_dequant_within_budget(autocast, bias):
    # torch 2.13 runs float8 _scaled_mm (rowwise scales) on CPU, so both paths run here.
    needs_cpu_rowwise_scaled_mm()
    linear = nn.Linear(256, 128, bias=bias)
    x = torch.randn(2, 40, 256)
    layers = {kernel: Float8Linear.from_linear(linear, kernel) for kernel in Kernel if kernel is not Kernel.INT_MM}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        outs = {kernel: layer(x) for kernel, layer in layers.items()}
    expected_dtype = torch.bfloat16 if autocast else torch.float32
    assert all(out.dtype == expected_dtype and out.shape == (2, 40, 128) for out in outs.values())
    # Same arithmetic, only the accumulation order (and the bf16 output rounding) differ.
    assert rel_l2(outs[Kernel.SCALED_MM], outs[Kernel.EMULATED]) <= (4e-3 if autocast else 1e-6)
    # Dequant is weight-only: it differs by the activation quantization alone.
    assert 1e-3 < rel_l2(outs[Kernel.SCALED_MM], outs[Kernel.DEQUANT]) <= 5e-2


@pytest.mark.parametrize("rows", [3, 40])  # 3 < 17 exercises the zero-padding CUDA needs
def test_int_mm_path_equals_w8a8_emulation(rows):
    linear = nn.Linear(256, 128)
    x = torch.randn(rows, 256)
    with torch.no_grad():
        exact = Int8Linear.from_linear(linear, Kernel.INT_MM)(x)
        emulated = Int8Linear.from_linear(linear, Kernel.EMULATED)(x)
        dequant = Int8Linear.from_linear(linear, Kernel.DEQUANT)(x)
    assert exact.shape == (rows, 128)
    assert rel_l2(exact, emulated) <= 1e-6
    assert 1e-4 < rel_l2(exact, dequant) <= 1.2e-2


def test_kernel_choice_on_cpu_and_alignment_fallback():
    cpu = torch.device("cpu")
    assert Float8Linear.from_linear(nn.Linear(64, 32)).kernel_for(cpu) is Kernel.DEQUANT
    assert Int8Linear.from_linear(nn.Linear(64, 32)).kernel_for(cpu) is Kernel.INT_MM
    unaligned = Int8Linear.from_linear(nn.Linear(12, 32))  # K not a multiple of 8
    assert not unaligned.aligned and unaligned.kernel_for(cpu) is Kernel.DEQUANT
    assert not Float8Linear.from_linear(nn.Linear(64, 24)).aligned  # N not a multiple of 16
    with torch.no_grad():
        out = unaligned(torch.randn(5, 12))
    assert out.shape == (5, 32) and torch.isfinite(out).all()


def test_module_to_dtype_keeps_the_stored_format():
    layer = Float8Linear.from_linear(nn.Linear(64, 32)).to(torch.bfloat16)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16
    layer = Int8Linear.from_linear(nn.Linear(64, 32)).half()
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32


def test_zero_rows_quantize_to_zero():
    # Padding tokens are all-zero rows: their scale is floored, never 0/0.
    layer = Int8Linear.from_linear(nn.Linear(64, 32, bias=False), Kernel.INT_MM)
    with torch.no_grad():
        out = layer(torch.zeros(20, 64))
    assert torch.equal(out, torch.zeros(20, 32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_w8a8_kernels_on_cuda_match_emulation():
    device = torch.device("cuda")
    capability = torch.cuda.get_device_capability()
    linear = nn.Linear(512, 256).to(device)
    x = torch.randn(3, 50, 512, device=device)
    fp8, int8 = Float8Linear.from_linear(linear), Int8Linear.from_linear(linear)
    if capability >= (8, 9):
        assert fp8.kernel_for(device) is Kernel.SCALED_MM
    if capability >= (8, 0):
        assert int8.kernel_for(device) is Kernel.INT_MM
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        outs = {"fp8": fp8(x), "fp8 emulated": Float8Linear.from_linear(linear, Kernel.EMULATED)(x),
                "int8": int8(x), "int8 emulated": Int8Linear.from_linear(linear, Kernel.EMULATED)(x),
                "int8 M=5": int8(x[0, :5])}  # M < 17: zero-padded for CUDA's _int_mm
    assert outs["fp8"].dtype == torch.bfloat16
    # The W8A8 GEMMs against their float32 emulation: bf16 output rounding only. (Where a
    # kernel is not available the module dequantizes, and these bounds do not apply.)
    if fp8.kernel_for(device) is Kernel.SCALED_MM:
        assert rel_l2(outs["fp8"], outs["fp8 emulated"]) <= 4e-3
    if int8.kernel_for(device) is Kernel.INT_MM:
        assert rel_l2(outs["int8"], outs["int8 emulated"]) <= 4e-3
        assert rel_l2(outs["int8 M=5"], outs["int8 emulated"][0, :5]) <= 4e-3


# --- quantized checkpoints -------------------------------------------------------------------

@pytest.fixture(scope="module")
def source_hash() -> str:
    return source_weights_sha256(T2V_HIGH)


@pytest.mark.parametrize("scheme", list(Scheme)[1:])
def test_save_load_round_trip_is_exact(scheme, tmp_path, fixture_inputs, source_hash):
    needs_quanto(scheme)
    model = quantize(load_dit(T2V_HIGH), scheme, ALL_BLOCKS)
    manifest_path = save_quantized(model, tmp_path, source_hash, max_shard_bytes=64 * 1024)
    assert len(list(tmp_path.glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 1
    loaded = load_quantized(tmp_path, expect_config=model.config, scheme=scheme, source_hash=source_hash)
    saved_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert saved_state.keys() == loaded_state.keys()
    for key, tensor in saved_state.items():
        assert loaded_state[key].dtype == tensor.dtype, key
        assert torch.equal(_bitwise(loaded_state[key]), _bitwise(tensor)), key
    assert same_outputs(loaded, model, fixture_inputs)
    assert loaded.quant_report == model.quant_report
    manifest = json.loads(manifest_path.read_text())
    assert (manifest["scheme"], manifest["source_sha256"]) == (scheme.value, source_hash)
    assert manifest["policy"] == ALL_BLOCKS.to_dict()

    # A smaller save into the same folder leaves no stale shard or index behind.
    save_quantized(model, tmp_path, source_hash)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors", MANIFEST_NAME]


def test_guarded_model_round_trip(tmp_path, fixture_inputs, source_hash):
    model = load_dit(T2V_HIGH)
    damage_ffn_input(model)
    report = calibrate_and_guard(model, [fixture_inputs], "fp8", ALL_BLOCKS)
    save_quantized(model, tmp_path, source_hash)
    loaded = load_quantized(tmp_path)
    assert loaded.quant_report == report and type(loaded.blocks[0].ffn[2]) is nn.Linear
    assert same_outputs(loaded, model, fixture_inputs)


def _set(key, value):
    def mutate(manifest):
        manifest[key] = value
    return mutate


def _keep_layer(manifest):
    layer = next(layer for layer in manifest["layers"] if layer["quantized"])
    layer.update(quantized=False, scheme="bf16")


@pytest.mark.parametrize("mutate,kwargs,message", [
    (_set("wanrt_version", "0.0.1"), {}, "written by wanrt '0.0.1'"),
    (_set("format_version", 2), {}, "not a wanrt-quantized-dit v1 manifest"),
    (_set("scheme", "int8"), {}, "quantized tensors stored with the wrong dtype"),
    (_set("scheme", "fp4"), {}, "quantization scheme 'fp4' is unknown"),
    (_keep_layer, {}, "unexpected keys: blocks.0.self_attn.q.weight_scale"),
    (lambda m: m["layers"].pop(), {}, "does not list the model's Linear layers"),
    (None, {"scheme": "int8"}, "holds fp8 weights but int8 was asked for"),
    (None, {"source_hash": "0" * 64}, "quantize these weights again"),
    (None, {"expect_config": get_task("tiny-i2v").dit}, "does not fit the task"),
])
def test_mismatched_manifest_is_refused(mutate, kwargs, message, tmp_path, source_hash):
    save_quantized(quantize(load_dit(T2V_HIGH), "fp8", ALL_BLOCKS), tmp_path, source_hash)
    manifest_path = tmp_path / MANIFEST_NAME
    if mutate is not None:
        manifest = json.loads(manifest_path.read_text())
        mutate(manifest)
        manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=message) as error:
        load_quantized(tmp_path, **kwargs)
    assert "\n" not in str(error.value)


def test_unfinished_or_unquantized_folders_are_refused(tmp_path, source_hash):
    with pytest.raises(CheckpointError, match="no quantization.json"):
        load_quantized(T2V_HIGH)
    with pytest.raises(ConfigError, match="not quantized"):
        save_quantized(load_dit(T2V_HIGH), tmp_path, source_hash)
    with pytest.raises(ConfigError, match="not a lowercase hex sha256"):
        save_quantized(quantize(load_dit(T2V_HIGH), "fp8"), tmp_path, "abc")
    save_quantized(quantize(load_dit(T2V_HIGH), "fp8", ALL_BLOCKS), tmp_path, source_hash)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_quantized(tmp_path)


# --- T5 in 8 bits (bitsandbytes) -------------------------------------------------------------

@pytest.fixture(scope="module")
def bitsandbytes_on_cpu():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes (extra 'quant') is not installed")
    probe = quantize_text_encoder(nn.Sequential(nn.Linear(64, 64)))
    try:
        probe(torch.randn(2, 64))
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"bitsandbytes {bnb.__version__} cannot run Linear8bitLt on this CPU: {exc}")
    return bnb


def test_t5_in_8bit_with_bitsandbytes(bitsandbytes_on_cpu):
    from wanrt.configs import TINY_T5
    from wanrt.models.t5 import UMT5Encoder

    encoder = UMT5Encoder(TINY_T5)
    encoder.load_state_dict(torch.load(FIXTURES / "t5/umt5_tiny_enc.pth", weights_only=True))
    encoder.eval()
    tensors, _ = load_fixture("t5/t5")
    ids, mask = tensors["short.ids"], tensors["short.mask"]
    with torch.no_grad():
        reference = encoder(ids, mask)
        quantize_text_encoder(encoder)
        out = encoder(ids, mask)
    layers = [m for m in encoder.modules() if isinstance(m, bitsandbytes_on_cpu.nn.Linear8bitLt)]
    assert len(layers) == 2 * 7 and not any(type(m) is nn.Linear for m in encoder.modules())
    assert 1e-4 < rel_l2(out, reference) <= 2e-2
