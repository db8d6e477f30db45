"""LoRA merging: every key format written in its exact layout merges to the hand-computed
weights; strength 0 is a no-op; the merged model equals the LoRA applied on the fly; fp8
quantization after the merge; per-expert LoRAs; bad files refused with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from wanrt.configs import get_task
from wanrt.errors import InputError
from wanrt.export.quantize import PrecisionPolicy, quantize
from wanrt.loading.checkpoint import Expert
from wanrt.lora import LoadedLora, LoraError, LoraExpert, LoraFormat, LoraSpec, merge_loras, parameter_shapes
from wanrt.models.dit import WanDiT
from wanrt.pipelines import Pipeline
from wanrt.random_weights import randomize_

TASK = get_task("tiny-t2v")
RANK = 4


def tiny_dit(seed: int = 0) -> WanDiT:
    with torch.device("meta"):
        model = WanDiT(TASK.dit)
    return randomize_(model, seed).eval().requires_grad_(False)


def pair(module_shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(down [r, in...], up [out, r, 1...]) for a weight of `module_shape`."""
    generator = torch.Generator().manual_seed(seed)
    down = torch.randn(RANK, *module_shape[1:], generator=generator) * 0.1
    up = torch.randn(module_shape[0], RANK, *([1] * (len(module_shape) - 2)), generator=generator) * 0.1
    return down, up


def low_rank(down: torch.Tensor, up: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return (up.flatten(1) @ down.flatten(1)).view(shape)


def load(path, strength: float = 1.0, expert: LoraExpert = LoraExpert.BOTH) -> LoadedLora:
    return LoadedLora(LoraSpec(path, strength, expert), parameter_shapes(tiny_dit()))


def merged_state(*loras: LoadedLora) -> dict[str, torch.Tensor]:
    model = tiny_dit()
    merge_loras(model, loras)
    return model.state_dict()


def check_deltas(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Changed parameters equal original + hand delta; every other parameter is untouched."""
    original = tiny_dit().state_dict()
    for name, tensor in state.items():
        if name in expected:
            torch.testing.assert_close(tensor, original[name] + expected[name], rtol=0, atol=1e-6)
        else:
            assert torch.equal(tensor, original[name]), name


def wan_lora(tmp_path):
    """Official names as ComfyUI/LightX2V write them: pairs with alpha, lora_A/B without,
    full deltas (.diff, .diff_b, .diff_m incl. head), a Conv3d pair, two prefixes."""
    shapes = parameter_shapes(tiny_dit())
    tensors, expected = {}, {}
    for seed, (module, prefix, names, alpha) in enumerate([
            ("blocks.0.self_attn.q", "diffusion_model.", ("lora_down", "lora_up"), 2.0),
            ("blocks.1.cross_attn.o", "model.diffusion_model.", ("lora_A", "lora_B"), None),
            ("blocks.0.ffn.2", "diffusion_model.", ("lora_down", "lora_up"), 8.0),
            ("head.head", "diffusion_model.", ("lora_A", "lora_B"), 1.0),
            ("patch_embedding", "diffusion_model.", ("lora_down", "lora_up"), 4.0)]):
        shape = shapes[f"{module}.weight"]
        down, up = pair(shape, seed)
        tensors[f"{prefix}{module}.{names[0]}.weight"] = down
        tensors[f"{prefix}{module}.{names[1]}.weight"] = up
        if alpha is not None:
            tensors[f"{prefix}{module}.alpha"] = torch.tensor(alpha)
        expected[f"{module}.weight"] = (1.0 if alpha is None else alpha / RANK) * low_rank(down, up, shape)
    for key, parameter in [("blocks.0.norm3.diff", "blocks.0.norm3.weight"),
                           ("blocks.0.self_attn.q.diff_b", "blocks.0.self_attn.q.bias"),
                           ("blocks.1.diff_m", "blocks.1.modulation"), ("head.diff_m", "head.modulation")]:
        tensors[f"diffusion_model.{key}"] = expected[parameter] = torch.randn(shapes[parameter]) * 0.01
    path = tmp_path / "wan.safetensors"
    save_file(tensors, path)
    return path, expected


def test_wan_comfy_format_merges_to_the_hand_computed_weights(tmp_path):
    path, expected = wan_lora(tmp_path)
    lora = load(path, strength=0.5)
    assert lora.file.format is LoraFormat.WAN and lora.plan.skipped == []
    check_deltas(merged_state(lora), {k: 0.5 * v for k, v in expected.items()})


def test_musubi_format_merges_to_the_hand_computed_weights(tmp_path):
    shapes = parameter_shapes(tiny_dit())
    tensors, expected = {}, {}
    for seed, module in enumerate(["blocks.0.self_attn.k", "blocks.1.cross_attn.v", "blocks.1.ffn.0"]):
        down, up = pair(shapes[f"{module}.weight"], seed)
        flat = "lora_unet_" + module.replace(".", "_")
        tensors |= {f"{flat}.lora_down.weight": down, f"{flat}.lora_up.weight": up, f"{flat}.alpha": torch.tensor(2.0)}
        expected[f"{module}.weight"] = 2.0 / RANK * low_rank(down, up, shapes[f"{module}.weight"])
    save_file(tensors, tmp_path / "musubi.safetensors")
    lora = load(tmp_path / "musubi.safetensors")
    assert lora.file.format is LoraFormat.MUSUBI
    check_deltas(merged_state(lora), expected)


def test_diffusers_format_merges_through_the_checkpoint_key_map(tmp_path):
    shapes = parameter_shapes(tiny_dit())
    tensors, expected = {}, {}
    for seed, (diffusers, official) in enumerate([
            ("blocks.0.attn1.to_q", "blocks.0.self_attn.q"), ("blocks.1.attn2.to_out.0", "blocks.1.cross_attn.o"),
            ("blocks.0.ffn.net.0.proj", "blocks.0.ffn.0"), ("proj_out", "head.head"),
            ("condition_embedder.time_proj", "time_projection.1")]):
        down, up = pair(shapes[f"{official}.weight"], seed)
        tensors |= {f"transformer.{diffusers}.lora_A.weight": down, f"transformer.{diffusers}.lora_B.weight": up}
        expected[f"{official}.weight"] = 1.5 * low_rank(down, up, shapes[f"{official}.weight"])  # no alpha
    save_file(tensors, tmp_path / "diffusers.safetensors")
    lora = load(tmp_path / "diffusers.safetensors", strength=1.5)
    assert lora.file.format is LoraFormat.DIFFUSERS
    check_deltas(merged_state(lora), expected)
    # diffusers' save_lora_weights stores alpha and r as metadata: scale = alpha / r.
    metadata = {"lora_adapter_metadata": json.dumps({"transformer.r": RANK, "transformer.lora_alpha": 2})}
    save_file(tensors, tmp_path / "with_metadata.safetensors", metadata=metadata)
    check_deltas(merged_state(load(tmp_path / "with_metadata.safetensors", strength=1.5)),
                 {k: 2 / RANK * v for k, v in expected.items()})


def test_peft_adapter_folder_takes_alpha_and_patterns_from_its_config(tmp_path):
    shapes = parameter_shapes(tiny_dit())
    folder = tmp_path / "relighting_lora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": RANK, "lora_alpha": 8, "alpha_pattern": {"ffn.0": 2},
         "target_modules": ["q", "ffn.0"]}))
    tensors, expected = {}, {}
    for seed, (module, alpha) in enumerate([("blocks.0.self_attn.q", 8), ("blocks.1.ffn.0", 2)]):
        down, up = pair(shapes[f"{module}.weight"], seed)
        tensors |= {f"base_model.model.{module}.lora_A.weight": down, f"base_model.model.{module}.lora_B.weight": up}
        expected[f"{module}.weight"] = alpha / RANK * low_rank(down, up, shapes[f"{module}.weight"])
    save_file(tensors, folder / "adapter_model.safetensors")
    check_deltas(merged_state(load(folder)), expected)


def test_loras_stack_and_strength_zero_is_bit_exact_no_op(tmp_path):
    path, expected = wan_lora(tmp_path)
    original = tiny_dit().state_dict()
    for name, tensor in merged_state(load(path, strength=0.0)).items():
        assert torch.equal(tensor, original[name]), name
    # Two LoRAs sum in float32 before one cast: 0.25 + 0.5 of the same delta.
    check_deltas(merged_state(load(path, strength=0.25), load(path, strength=0.5)),
                 {k: 0.75 * v for k, v in expected.items()})


def _on_the_fly(model: WanDiT, lora: LoadedLora, strength: float) -> list:
    """The reference: the unmerged model with each pair added to its Linear's output."""
    modules = dict(model.named_modules())
    tensors = lora.file.read()
    handles = []
    for patch in lora.plan.patches:
        down, up = tensors[patch.down], tensors[patch.up]
        scale = strength * float(tensors[patch.alpha]) / RANK if patch.alpha else strength

        def hook(module, args, output, down=down, up=up, scale=scale):
            return output + scale * F.linear(F.linear(args[0], down.to(args[0].dtype)), up.to(args[0].dtype))
        handles.append(modules[patch.parameter.removesuffix(".weight")].register_forward_hook(hook))
    return handles


def test_merged_model_equals_the_lora_applied_on_the_fly(tmp_path):
    shapes = parameter_shapes(tiny_dit())
    linears = [name.removesuffix(".weight") for name in shapes
               if name.startswith("blocks.") and name.endswith(".weight") and len(shapes[name]) == 2]
    tensors = {}
    for seed, module in enumerate(linears):
        down, up = pair(shapes[f"{module}.weight"], seed)
        tensors |= {f"diffusion_model.{module}.lora_down.weight": down,
                    f"diffusion_model.{module}.lora_up.weight": up,
                    f"diffusion_model.{module}.alpha": torch.tensor(float(seed % 3 + 1))}
    save_file(tensors, tmp_path / "all.safetensors")
    lora = load(tmp_path / "all.safetensors", strength=0.8)
    x = torch.randn(1, 16, 2, 8, 8)
    t = torch.tensor([700.0])
    context = torch.randn(1, 7, TASK.dit.text_dim)
    reference_model = tiny_dit()
    _on_the_fly(reference_model, lora, 0.8)
    merged = tiny_dit()
    merge_loras(merged, [lora])
    with torch.no_grad():
        reference, output = reference_model(x, t, context), merged(x, t, context)
        plain = tiny_dit()(x, t, context)
    assert (output - plain).abs().max() > 1e-2  # the LoRA matters
    assert (output - reference).abs().max() <= 1e-5


def test_fp8_quantization_after_the_merge_keeps_the_lora(tmp_path):
    path, _ = wan_lora(tmp_path)
    lora = load(path)
    x, t, context = torch.randn(1, 16, 2, 8, 8), torch.tensor([500.0]), torch.randn(1, 7, TASK.dit.text_dim)
    every_block = PrecisionPolicy(keep_first_blocks=0, keep_last_blocks=0)
    merged = tiny_dit()
    merge_loras(merged, [lora])
    with torch.no_grad():
        target = merged(x, t, context)
        quantize(merged, "fp8", every_block)
        assert merged.quant_report.summary().startswith("fp8: 20/26 linears quantized")
        error_merged = (merged(x, t, context) - target).abs().max().item()
        error_unmerged = (quantize(tiny_dit(), "fp8", every_block)(x, t, context) - target).abs().max().item()
    # What fp8 loses is its own rounding, a fraction of what the LoRA changes.
    assert error_merged < 0.2 * error_unmerged


@pytest.mark.usefixtures("cache_dir")  # the SHA-256 memo
def test_per_expert_loras_patch_only_their_expert(tmp_path):
    path, expected = wan_lora(tmp_path)
    experts = {Expert.HIGH_NOISE: tiny_dit(), Expert.LOW_NOISE: tiny_dit()}
    pipeline = Pipeline.from_models(TASK, experts, loras=[LoraSpec(path, 1.0, LoraExpert.HIGH_NOISE),
                                                          LoraSpec(path, 0.5, LoraExpert.BOTH)])
    check_deltas(experts[Expert.HIGH_NOISE].state_dict(), {k: 1.5 * v for k, v in expected.items()})
    check_deltas(experts[Expert.LOW_NOISE].state_dict(), {k: 0.5 * v for k, v in expected.items()})
    record = pipeline.lora_records()[0]
    assert (record["expert"], record["strength"], record["format"]) == ("high_noise", 1.0, "wan")
    assert len(record["sha256"]) == 64


def test_lightning_folder_gives_one_lora_per_expert(tmp_path):
    path, expected = wan_lora(tmp_path)
    folder = tmp_path / "Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1"
    folder.mkdir()
    for name in ("high_noise_model", "low_noise_model"):
        (folder / f"{name}.safetensors").write_bytes(path.read_bytes())
    experts = {Expert.HIGH_NOISE: tiny_dit(), Expert.LOW_NOISE: tiny_dit()}
    pipeline = Pipeline.from_models(TASK, experts, loras=[LoraSpec.parse(f"{folder}:0.5")])
    assert [(lora.spec.path.name, lora.spec.expert) for lora in pipeline.loras] == [
        ("high_noise_model.safetensors", LoraExpert.HIGH_NOISE), ("low_noise_model.safetensors", LoraExpert.LOW_NOISE)]
    for model in experts.values():
        check_deltas(model.state_dict(), {k: 0.5 * v for k, v in expected.items()})


def test_wan21_image_branch_keys_are_skipped_and_reported(tmp_path):
    path, _ = wan_lora(tmp_path)
    tensors = load_file(path)
    for seed, name in enumerate(("k_img", "v_img")):
        down, up = pair((64, 64), seed)
        tensors |= {f"diffusion_model.blocks.0.cross_attn.{name}.lora_down.weight": down,
                    f"diffusion_model.blocks.0.cross_attn.{name}.lora_up.weight": up}
    tensors["diffusion_model.blocks.0.cross_attn.norm_k_img.diff"] = torch.ones(64)
    save_file(tensors, tmp_path / "wan21_i2v.safetensors")
    lora = load(tmp_path / "wan21_i2v.safetensors")
    assert len(lora.plan.skipped) == 5 and all("_img" in key for key in lora.plan.skipped)


def _bad(tmp_path, case: str):
    shapes = parameter_shapes(tiny_dit())
    down, up = pair(shapes["blocks.0.self_attn.q.weight"], 0)
    key = "diffusion_model.blocks.0.self_attn.q"
    path = tmp_path / f"{case}.safetensors"
    if case == "missing-pair":
        save_file({f"{key}.lora_down.weight": down}, path)
    elif case == "wrong-rank":
        save_file({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up[:, :2].contiguous()}, path)
    elif case == "unknown-keys":
        save_file({"diffusion_model.blocks.9.self_attn.q.lora_down.weight": down,
                   "diffusion_model.blocks.9.self_attn.q.lora_up.weight": up}, path)
    elif case == "traversal":
        save_file({"diffusion_model.blocks.0/../../etc.lora_down.weight": down,
                   "diffusion_model.blocks.0/../../etc.lora_up.weight": up}, path)
    elif case == "pickle":
        path = tmp_path / "evil.ckpt"
        torch.save({f"{key}.lora_down.weight": down, "payload": _Evil()}, path)
    return path


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


BAD_CASES = {"missing-pair": "no lora_up/lora_B weight", "wrong-rank": "rank mismatch",
             "unknown-keys": "match no parameter", "traversal": "match no parameter",
             "pickle": "refused to load"}


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_lora_files_are_refused_naming_file_and_keys(tmp_path, case, capsys):
    path = _bad(tmp_path, case)
    with pytest.raises(LoraError, match=BAD_CASES[case]) as error:
        Pipeline.from_models(TASK, {Expert.HIGH_NOISE: tiny_dit()}, loras=[LoraSpec(path)])
    assert str(error.value).startswith(f"--lora {path}")
    assert "this must never run" not in capsys.readouterr().out


def test_lora_option_parsing_and_single_dit_tasks():
    assert LoraSpec.parse("a/b.safetensors:0.7") == LoraSpec(Path("a/b.safetensors"), 0.7)
    assert LoraSpec.parse("C:\\loras\\x.safetensors").strength == 1.0
    with pytest.raises(InputError, match="--lora-high .* single DiT; use --lora"):
        Pipeline.from_models(get_task("tiny-ti2v"), {}, loras=[LoraSpec("x", 1.0, LoraExpert.HIGH_NOISE)])


def test_pipeline_merges_before_it_quantizes(checkpoints, tmp_path, monkeypatch):
    """`--precision fp8` quantizes what the loader returns: the LoRA must already be in it."""
    import wanrt.export.quantize as quantize_module
    from wanrt.loading.checkpoint import load_dit, locate_checkpoint

    path, expected = wan_lora(tmp_path)
    seen = {}
    original = quantize_module.quantize

    def spying_quantize(model, scheme, *args, **kwargs):
        seen["q"] = model.blocks[0].self_attn.q.weight.detach().clone()
        return original(model, scheme, *args, **kwargs)
    monkeypatch.setattr(quantize_module, "quantize", spying_quantize)
    files = locate_checkpoint(checkpoints["tiny-t2v"], TASK)
    pipeline = Pipeline(TASK, files, torch.device("cpu"), torch.float32, precision="fp8",
                        loras=[LoraSpec(path, 1.0, LoraExpert.HIGH_NOISE)])
    pipeline.dit(Expert.HIGH_NOISE)
    loaded = load_dit(files.dit_dirs[Expert.HIGH_NOISE], expect=TASK.dit, dtype=torch.float32)
    merged = loaded.blocks[0].self_attn.q.weight + expected["blocks.0.self_attn.q.weight"]
    torch.testing.assert_close(seen["q"], merged, rtol=0, atol=1e-6)
