"""Single checkpoint files as users download them (ComfyUI, Kijai, LightX2V, GGUF): each
layout written tiny from the fixture models (`single_file_layouts`) and loaded through the
production loaders.

Error budgets (relative L2 of the whole t2v fixture DiT output against the float32 folder,
on the g1 fixture inputs; measured on torch 2.13 CPU; budget = measured + ~30-40% margin).
The figures include the fp16/bf16 rounding of the tensors the files keep in high precision
(3.0e-3 for an all-bf16 file).

| file layout                                   | measured | budget                      |
|-----------------------------------------------|----------|-----------------------------|
| ComfyUI scaled fp8 e4m3 (per-tensor scale)    | 1.7e-2   | 2.2e-2 (wanrt's fp8 budget) |
| Kijai fp8 e4m3 cast (no scale)                | 2.0e-2   | 2.2e-2                      |
| comfy_quant fp8 e4m3 (header table)           | 1.8e-2   | 2.2e-2                      |
| comfy_quant mixed e4m3 / e5m2 / int8 rows     | 2.0e-2   | 2.2e-2                      |
| LightX2V fp8 e4m3 (per-channel scale)         | 1.4e-2   | 2.2e-2                      |
| ComfyUI scaled fp8 e5m2 (2 mantissa bits)     | 2.9e-2   | 4e-2                        |
| LightX2V int8 (per-channel)                   | 6.4e-3   | 8e-3 (wanrt's int8 budget)  |
| GGUF Q8_0 (int8, 32-value blocks)             | 3.1e-3   | 4.5e-3                      |
| GGUF Q4_K (the plain test quantizer below)    | 4.3e-2   | 6e-2                        |
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES, load_fixture
from single_file_layouts import (block_linear_weights, comfy_quant, comfy_scaled_fp8, kijai_fp8, lightx2v,
                                 save, write_gguf)
from typer.testing import CliRunner

from wanrt.cli.app import app
from wanrt.configs import TINY_T5, TINY_WAN21_VAE, get_task
from wanrt.errors import CheckpointError, InputError
from wanrt.export.quantize import Float8Linear, Int8Linear
from wanrt.loading import diffusers_t5
from wanrt.loading.checkpoint import Expert, load_dit, load_t5, load_vae, locate_checkpoint
from wanrt.loading.component_files import ComponentFiles, apply_component_files, stored_precision
from wanrt.loading.gguf_file import dequantize_blocks
from wanrt.loading.save import save_dit_official
from wanrt.loading.stored_linears import Float8E5M2Linear, Int8BlockLinear

T2V_HIGH = FIXTURES / "dit/t2v/high_noise_model"
FP8_BUDGET, INT8_BUDGET = 2.2e-2, 8e-3


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.fixture(scope="module")
def reference():
    """The float32 fixture DiT, its state dict and its output on the g1 inputs."""
    model = load_dit(T2V_HIGH)
    tensors, _ = load_fixture("dit/forward_t2v")
    inputs = {"x": tensors["g1.x"][None], "timestep": tensors["t_scalar"], "context": tensors["context"][None]}
    with torch.no_grad():
        out = model(**inputs)
    return model, model.state_dict(), inputs, out


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model."])
def test_bf16_single_file_equals_the_official_folder(reference, tmp_path, prefix):
    model = reference[0]
    # The same bf16 tensors (the modules kept in float32 stay float32) as a folder and a file.
    bf16 = load_dit(T2V_HIGH, dtype=torch.bfloat16)
    save_dit_official(bf16, tmp_path / "folder")
    path = save(tmp_path / "wan2.2_t2v_high_noise_14B_bf16.safetensors", bf16.state_dict(), prefix=prefix)
    from_folder = load_dit(tmp_path / "folder", expect=model.config, dtype=torch.float32).state_dict()
    from_file = load_dit(path, expect=model.config, dtype=torch.float32).state_dict()
    assert from_file.keys() == from_folder.keys()
    assert all(torch.equal(from_file[key], from_folder[key]) for key in from_folder)
    assert all(t.dtype == torch.float32 for t in from_file.values())


def _comfy_quant_mixed(state):
    formats = ("int8_tensorwise", "float8_e4m3fn", "float8_e5m2")
    return comfy_quant(state, {key: formats[i % 3] for i, key in enumerate(block_linear_weights(state))})


EIGHT_BIT_CASES = {
    # id: (write the tensors (+ header metadata), module class of a block Linear, budget)
    "comfy-scaled-fp8": (lambda s: (comfy_scaled_fp8(s), None), Float8Linear, FP8_BUDGET),
    "kijai-scaled-KJ-no-marker": (lambda s: (comfy_scaled_fp8(s, marker=False), None), Float8Linear, FP8_BUDGET),
    "comfy-scaled-fp8-e5m2": (lambda s: (comfy_scaled_fp8(s, torch.float8_e5m2), None), Float8E5M2Linear, 4e-2),
    "comfy-quant-header": (lambda s: comfy_quant(s, {k: "float8_e4m3fn" for k in block_linear_weights(s)},
                                                 in_header=True), Float8Linear, FP8_BUDGET),
    "comfy-quant-mixed": (_comfy_quant_mixed, None, FP8_BUDGET),
    "kijai-fp8-e4m3fn": (lambda s: (kijai_fp8(s), None), Float8Linear, FP8_BUDGET),
    "lightx2v-fp8": (lambda s: (lightx2v(s, torch.float8_e4m3fn), None), Float8Linear, FP8_BUDGET),
    "lightx2v-int8": (lambda s: (lightx2v(s, torch.int8), None), Int8Linear, INT8_BUDGET),
}


@pytest.mark.parametrize("case", EIGHT_BIT_CASES)
def test_eight_bit_files_run_as_stored_within_budget(reference, tmp_path, case):
    model, state, inputs, expected = reference
    write, module_class, budget = EIGHT_BIT_CASES[case]
    tensors, metadata = write(state)
    loaded = load_dit(save(tmp_path / "dit.safetensors", tensors, metadata), expect=model.config,
                      dtype=torch.float32)
    for key in block_linear_weights(state):
        layer = loaded.get_submodule(key.removesuffix(".weight"))
        assert module_class is None or type(layer) is module_class
        # The file's 8-bit values are the module's weight, bit for bit: no bf16 round trip.
        assert layer.weight.dtype == tensors[key].dtype and torch.equal(layer.weight, tensors[key])
    assert type(loaded.get_submodule("text_embedding.0")) is torch.nn.Linear
    error = rel_l2(run(loaded, inputs), expected)
    assert budget / 20 < error <= budget, f"{case}: rel err {error:.3g} (budget {budget:.1g})"
    assert loaded.quant_report.summary().startswith(("fp8: 20/26", "int8: 20/26"))


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K", "Q8_0"])
def test_gguf_block_dequantizer_equals_the_gguf_package(type_name):
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, type_name)
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(64, block_bytes), dtype=np.uint8)
    # Finite fp16 super-block scales (d, dmin) where each type keeps them; the rest is any bits.
    offsets = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q8_0": (0,)}[type_name]
    for offset in offsets:
        raw[:, offset:offset + 2] = rng.uniform(-0.01, 0.01, (64, 1)).astype(np.float16).view(np.uint8)
    expected = gguf.quants.dequantize(raw, qtype).reshape(-1)
    actual = dequantize_blocks(torch.from_numpy(raw.copy()).reshape(-1), type_name)
    assert actual.numel() == 64 * block_values
    assert np.array_equal(actual.numpy(), expected)


def test_gguf_q8_0_runs_int8_within_budget(reference, tmp_path):
    model, state, inputs, expected = reference
    loaded = load_dit(write_gguf(tmp_path / "Wan2.2-T2V-A14B-HighNoise-Q8_0.gguf", state, "Q8_0"),
                      expect=model.config, dtype=torch.float32)
    for key in block_linear_weights(state):
        layer = loaded.get_submodule(key.removesuffix(".weight"))
        assert type(layer) is Int8BlockLinear and layer.weight.dtype == torch.int8
        assert layer.weight_scale.shape == (layer.out_features, layer.in_features // 32)
        assert layer.weight_scale.dtype == torch.float16  # the stored Q8_0 scales, exactly
    error = rel_l2(run(loaded, inputs), expected)
    assert 4.5e-3 / 20 < error <= 4.5e-3, f"Q8_0: rel err {error:.3g}"


@pytest.mark.parametrize("five_d_patch", [True, False], ids=["patch-5d-f32", "patch-orig-shape"])
def test_gguf_k_quant_equals_the_gguf_dequantizer_and_stays_within_budget(reference, tmp_path, five_d_patch):
    import gguf

    model, state, inputs, expected = reference
    path = write_gguf(tmp_path / "Wan2.2-T2V-A14B-HighNoise-Q4_K_M.gguf", state, "Q4_K", five_d_patch)
    loaded = load_dit(path, expect=model.config, dtype=torch.float32)
    assert not hasattr(loaded, "quant_report")  # dequantized at load: plain Linears
    reader = gguf.GGUFReader(path)
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        stored = loaded.state_dict()[tensor.name]
        assert np.array_equal(stored.numpy().reshape(-1), values.reshape(-1)), tensor.name
    assert loaded.state_dict()["patch_embedding.weight"].shape == state["patch_embedding.weight"].shape
    error = rel_l2(run(loaded, inputs), expected)
    assert 6e-2 / 20 < error <= 6e-2, f"Q4_K: rel err {error:.3g}"


@pytest.mark.parametrize("layout", ["comfy-scaled-fp8", "gguf-q8_0"])
def test_stored_8bit_weights_stream_like_resident_ones(reference, tmp_path, layout):
    import copy

    from wanrt.runtime.streaming import BlockStreamer, block_layout

    model, state, inputs, _ = reference
    path = (save(tmp_path / "dit.safetensors", comfy_scaled_fp8(state)) if layout == "comfy-scaled-fp8"
            else write_gguf(tmp_path / "dit.gguf", state, "Q8_0"))
    resident = load_dit(path, expect=model.config, dtype=torch.float32)
    streamed = copy.deepcopy(resident)
    streamer = BlockStreamer("cpu", depth=1)
    streamer.register("high", streamed)
    streamer.expect_forward("high")
    assert torch.equal(run(streamed, inputs), run(resident, inputs))
    # What streams is the 8-bit block as stored: fewer bytes than the float32 block.
    block_bytes = block_layout(resident.blocks[0])[1]
    assert streamer.bytes_copied == 2 * block_bytes < 2 * block_layout(model.blocks[0])[1] / 2


# ---------------------------------------------------------------------- refusals


def test_wrong_variant_unknown_format_and_truncation_are_refused(reference, tmp_path):
    model, state, _, _ = reference
    i2v = get_task("tiny-i2v").dit
    bf16 = save(tmp_path / "t2v.safetensors", {k: t.to(torch.bfloat16) for k, t in state.items()})
    with pytest.raises(CheckpointError, match=r"t2v DiT does not fit the task: model_type t2v \(needs i2v\), in_dim 16"):
        load_dit(bf16, expect=i2v)
    tensors, metadata = comfy_quant(state, {block_linear_weights(state)[0]: "nvfp4"})
    with pytest.raises(CheckpointError, match="comfy_quant format nvfp4 is not supported"):
        load_dit(save(tmp_path / "nvfp4.safetensors", tensors, metadata), expect=model.config)
    rotated = {**tensors, f"{block_linear_weights(state)[0].removesuffix('.weight')}.comfy_quant":
               torch.tensor(list(b'{"format": "int8_tensorwise", "convrot": true}'), dtype=torch.uint8)}
    with pytest.raises(CheckpointError, match="comfy_quant format int8_tensorwise[+]convrot is not supported"):
        load_dit(save(tmp_path / "convrot.safetensors", rotated), expect=model.config)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load_dit(garbage, expect=model.config)
    vae_file = save(tmp_path / "vae.safetensors", {"conv1.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match="missing keys: patch_embedding.weight, head.head.weight.*does not hold a whole Wan2.2 DiT"):
        load_dit(vae_file, expect=model.config)
    for source in (bf16, write_gguf(tmp_path / "q8.gguf", state, "Q8_0")):
        cut = tmp_path / f"cut{source.suffix}"
        cut.write_bytes(source.read_bytes()[:-1000])
        with pytest.raises(CheckpointError, match="truncated"):
            load_dit(cut, expect=model.config)


def test_lightx2v_file_missing_high_precision_tensors_says_where_to_get_them(reference, tmp_path):
    model, state, _, _ = reference
    quantized_only = {key: t for key, t in lightx2v(state, torch.float8_e4m3fn).items()
                      if key.startswith("blocks.") and key.endswith(("weight", "weight_scale")) and "norm" not in key}
    with pytest.raises(CheckpointError, match=r"missing keys: .*lightx2v/Wan2.2-Distill-Models"):
        load_dit(save(tmp_path / "lx.safetensors", quantized_only), expect=model.config)


def test_gguf_of_unsupported_type_or_architecture_is_refused(reference, tmp_path):
    import gguf

    _, state, _, _ = reference
    writer = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "wan")
    writer.add_tensor("head.head.weight", np.zeros((64, 2 * 18), dtype=np.uint8),
                      raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(CheckpointError, match="GGUF type IQ4_NL .* is not supported"):
        load_dit(tmp_path / "iq.gguf", expect=get_task("tiny-t2v").dit)
    writer = gguf.GGUFWriter(str(tmp_path / "flux.gguf"), "flux")
    writer.add_tensor("img_in.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(CheckpointError, match="architecture 'flux', not a Wan DiT"):
        load_dit(tmp_path / "flux.gguf", expect=get_task("tiny-t2v").dit)


# ---------------------------------------------------------------------- VAE and T5


def test_vae_single_file_equals_the_pth(tmp_path):
    pth = FIXTURES / "vae/wan2_1/Wan2.1_VAE_tiny.pth"
    state = torch.load(pth, map_location="cpu", weights_only=True)
    path = save(tmp_path / "wan_2.1_vae.safetensors", state, prefix="first_stage_model.")
    from_file, from_pth = load_vae(path, TINY_WAN21_VAE).state_dict(), load_vae(pth, TINY_WAN21_VAE).state_dict()
    assert all(torch.equal(from_file[key], from_pth[key]) for key in from_pth)


def test_umt5_single_files_fp16_and_fp8_scaled(tmp_path):
    pth = FIXTURES / "t5/umt5_tiny_enc.pth"
    official = torch.load(pth, map_location="cpu", weights_only=True)
    transformers_names = diffusers_t5.to_diffusers(official)
    ids = torch.randint(0, TINY_T5.vocab_size, (2, TINY_T5.text_len))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = load_t5(pth, TINY_T5, torch.float32)(ids, mask)
        fp16_file = save(tmp_path / "umt5_xxl_fp16.safetensors",
                         {key: t.to(torch.float16) for key, t in transformers_names.items()})
        fp16 = load_t5(fp16_file, TINY_T5, torch.float32)(ids, mask)
        # ComfyUI's umt5_xxl_fp8_e4m3fn_scaled: every Linear scaled fp8, plus the tokenizer blob.
        scaled = comfy_scaled_fp8({key: t for key, t in transformers_names.items()})
        for key in [k for k in transformers_names if k.endswith(("q.weight", "k.weight", "v.weight", "o.weight",
                                                                 "wi_0.weight", "wi_1.weight", "wo.weight"))]:
            layer = key.removesuffix(".weight")
            scale = transformers_names[key].abs().max().float() / 448
            scaled[key] = (transformers_names[key].float() / scale).to(torch.float8_e4m3fn)
            scaled[f"{layer}.scale_weight"] = scale
        scaled["spiece_model"] = torch.tensor(list(b"sentencepiece"), dtype=torch.uint8)
        fp8 = load_t5(save(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors", scaled), TINY_T5, torch.float32)
        fp8_out = fp8(ids, mask)
    assert rel_l2(fp16, expected) <= 1e-3
    assert 1e-3 < rel_l2(fp8_out, expected) <= 4e-2


# ---------------------------------------------------------------------- CLI, pipeline, sidecar


def test_precision_follows_the_stored_weights(checkpoints, tmp_path):
    task = get_task("tiny-t2v")
    files = locate_checkpoint(checkpoints["tiny-t2v"], task)
    high_state = load_dit(files.dit_dirs[Expert.HIGH_NOISE], expect=task.dit).state_dict()
    high = save(tmp_path / "high.safetensors", comfy_scaled_fp8(high_state))
    replaced = apply_component_files(files, task, ComponentFiles(dit_high=high))
    assert stored_precision(replaced, "bf16").value == "bf16"  # the low-noise expert is a bf16 folder
    both = apply_component_files(files, task, ComponentFiles(dit_high=high, dit_low=high))
    assert stored_precision(both, "bf16").value == stored_precision(both, "fp8").value == "fp8"
    # auto takes what the files store over what the architecture would pick (int8 on sm_89).
    assert stored_precision(both, "auto", "sm_89").value == "fp8"
    assert stored_precision(replaced, "auto", "sm_90").value == "bf16"
    assert stored_precision(files, "auto", "sm_89").value == "int8"  # folders: the architecture's pick
    with pytest.raises(InputError, match="--precision int8: the DiT files already hold fp8 weights"):
        stored_precision(both, "int8")
    with pytest.raises(InputError, match="--dit: tiny-t2v has two experts"):
        apply_component_files(files, task, ComponentFiles(dit=high))


def test_generate_with_single_files_records_formats_and_hashes(checkpoints, tmp_path, cache_dir):
    task = get_task("tiny-t2v")
    root = checkpoints["tiny-t2v"]
    files = locate_checkpoint(root, task)
    states = {expert: load_dit(folder, expect=task.dit).state_dict() for expert, folder in files.dit_dirs.items()}
    high_state, low_state = states.values()
    high = save(tmp_path / "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", comfy_scaled_fp8(high_state),
                prefix="model.diffusion_model.")
    low = write_gguf(tmp_path / "wan2.2_t2v_low_noise-Q8_0.gguf", low_state, "Q8_0")
    vae = save(tmp_path / "wan_2.1_vae.safetensors",
               torch.load(files.vae, map_location="cpu", weights_only=True))
    runner = CliRunner()
    result = runner.invoke(app, ["generate", "--task", "tiny-t2v", "--ckpt-dir", str(root), "--prompt", "a cat",
                                 "--dit-high", str(high), "--dit-low", str(low), "--vae", str(vae),
                                 "--frame-num", "5", "--steps", "3", "--shift", "1", "--seed", "3",
                                 "--output", str(tmp_path / "out.mp4")])
    assert result.exit_code == 0, result.output
    sidecar = json.loads((tmp_path / "out.json").read_text())
    checkpoint = sidecar["checkpoint"]
    assert checkpoint["formats"][str(high.resolve())] == "comfy-scaled-fp8"
    assert checkpoint["formats"][str(low.resolve())] == "gguf"
    assert checkpoint["formats"][str(vae.resolve())] == "safetensors"
    assert {str(high.resolve()), str(low.resolve()), str(vae.resolve())} <= checkpoint["sha256"].keys()
    assert sidecar["runtime"]["quantization"]["high_noise"].startswith("fp8: ")
    assert sidecar["runtime"]["quantization"]["low_noise"].startswith("int8: ")
    # `wanrt decode` finishes the run with the VAE file it used.
    result = runner.invoke(app, ["decode", str(tmp_path / "out.latents.safetensors"), "--output",
                                 str(tmp_path / "decoded.mp4")])
    assert result.exit_code == 0, result.output
    decoded = json.loads((tmp_path / "decoded.json").read_text())
    assert decoded["decode_run"]["vae_sha256"] == checkpoint["sha256"][str(vae.resolve())]

    ti2v_state = load_dit(files.dit_dirs[Expert.HIGH_NOISE], expect=task.dit).state_dict()
    # A ti2v-5B-shaped expert (48 latent channels in and out) given to t2v.
    ti2v_state.update({"patch_embedding.weight": torch.zeros(64, 48, 1, 2, 2),
                       "head.head.weight": torch.zeros(192, 64), "head.head.bias": torch.zeros(192)})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(high.read_bytes()[:-100])
    unknown = tmp_path / "unknown.gguf"
    unknown.write_bytes(b"PK\x03\x04 a zip, not a GGUF")
    bad_files = {save(tmp_path / "ti2v.safetensors", ti2v_state): "this ti2v DiT does not fit the task: model_type ti2v (needs t2v)",
                 truncated: "truncated safetensors file", unknown: "not a GGUF file"}
    for bad, message in bad_files.items():
        result = runner.invoke(app, ["generate", "--task", "tiny-t2v", "--ckpt-dir", str(root), "--prompt", "a cat",
                                     "--dit-high", str(bad), "--dit-low", str(low)])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {bad}") and message in lines[0], result.stderr


# ---------------------------------------------------------------------- host memory

_RSS_PROBE = """
import sys, dataclasses, torch
from wanrt.loading.files import iter_safetensors
from wanrt.loading.single_file import load_dit_file
from wanrt.configs import DiTConfig
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
import wanrt.loading.gguf_file  # imported on first use: not part of what loading holds
before = status("VmRSS:")
if sys.argv[1] == "read":
    kept = dict(iter_safetensors(sys.argv[2]))
else:
    config = DiTConfig(**{**eval(sys.argv[3]), "model_type": "t2v"})
    kept = load_dit_file(sys.argv[2], config, torch.bfloat16).state_dict()
print(before, status("VmHWM:"), sum(t.numel() * t.element_size() for t in kept.values()))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_loading_a_file_peaks_within_1_1x_what_it_holds(tmp_path):
    """Peak RSS growth while reading a 160 MB file (40 tensors of 4 MB) stays within 1.1x its
    size, and loading a 290 MB bf16 DiT file within 1.1x the model it makes (larger than the
    file by the modules kept in float32): tensors go straight into their final buffers, no
    memory-mapped pages stay resident, no shard is held twice."""
    import dataclasses

    from wanrt.models.dit import WanDiT
    from wanrt.random_weights import randomize_

    tensors = save(tmp_path / "tensors.safetensors",
                   {f"blocks.{i}.weight": torch.full((1024, 1024), float(i)) for i in range(40)})
    config = dataclasses.replace(get_task("t2v-A14B").dit, dim=1024, ffn_dim=4096, num_heads=8, num_layers=8,
                                 text_dim=1024, text_len=16)
    with torch.device("meta"):
        dit = WanDiT(config)
    dit_file = save(tmp_path / "dit.safetensors", {k: t.to(torch.bfloat16) for k, t in randomize_(dit, 0).state_dict().items()})
    del dit
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "model_type"}
    for mode, path in (("read", tensors), ("load", dit_file)):
        result = subprocess.run([sys.executable, "-c", _RSS_PROBE, mode, str(path), repr(fields)],
                                capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        before, peak, held = map(int, result.stdout.split())
        assert held >= path.stat().st_size * 0.99
        assert peak - before <= 1.1 * held, f"{mode}: peak grew {(peak - before) / held:.2f}x what it holds"
