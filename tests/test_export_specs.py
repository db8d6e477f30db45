"""Export specs: the modules every exporter traces compute exactly what the models compute,
their inputs and outputs are what the specs say at every profile shape, and the profiles
follow the requested sizes and frame counts. No compilation here (see tests/test_aoti.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from wanrt.configs import get_task
from wanrt.errors import InputError
from wanrt.export.quantize import PrecisionPolicy, quantize
from wanrt.export.specs import (VAE_STEPS, Component, block_tensor_names, export_module, make_spec,
                                parse_axis, scaled_axis)
from wanrt.models.dit import WanDiT, rope_tables
from wanrt.models.vae import WanVAE
from wanrt.random_weights import randomize_

TASKS = ("tiny-t2v", "tiny-i2v", "tiny-ti2v")
DIT_COMPONENTS = (Component.DIT_PRE, Component.DIT_BLOCK, Component.DIT_POST)
# (component, per-token timesteps): every graph variant there is.
VARIANTS = [*((c, False) for c in Component), *((c, True) for c in DIT_COMPONENTS)]


@pytest.fixture(scope="module")
def models():
    built = {}
    for name in TASKS:
        task = get_task(name)
        built[name] = (task, randomize_(WanDiT(task.dit), seed=1).eval(), randomize_(WanVAE(task.vae), seed=2).eval())
    return built


def _model_for(component, dit, vae):
    return vae if component in VAE_STEPS else dit


@pytest.mark.parametrize("task_name", TASKS)
@pytest.mark.parametrize("component, per_token", VARIANTS)
def test_outputs_have_the_spec_dtypes_and_named_axes_at_every_profile_end(models, task_name, component, per_token):
    task, dit, vae = models[task_name]
    model = _model_for(component, dit, vae)
    spec = make_spec(component, model, task, task.sample.sizes, [9, 5], per_token_timesteps=per_token)
    module = export_module(component, model)
    for which in ("min", "opt", "max"):
        inputs = spec.example_inputs(which=which)
        axes: dict[str, int] = {}
        with torch.no_grad():
            outputs = module(*inputs)
        assert len(outputs) == len(spec.outputs)
        for tensor_spec, tensor in [*zip(spec.inputs, inputs), *zip(spec.outputs, outputs)]:
            assert tensor.dtype == tensor_spec.dtype, tensor_spec.name
            assert tensor.dim() == len(tensor_spec.shape), tensor_spec.name
            for size, dim in zip(tensor.shape, tensor_spec.shape):
                if isinstance(dim, int):
                    assert size == dim, f"{tensor_spec.name}: static axis {dim} is {size}"
                else:
                    # One value per axis name across all tensors: the names are a consistent
                    # system of dynamic axes, as TensorRT profiles and ONNX dim_params need.
                    base, factor = parse_axis(dim)
                    assert size % factor == 0
                    assert axes.setdefault(base, size // factor) == size // factor, f"{tensor_spec.name}.{dim}"


def test_the_profile_covers_the_requested_runs_with_the_first_as_opt(models):
    task, dit, _ = models["tiny-t2v"]
    # 96*64 -> latent 8x12 -> 4x6 patches; 64*64 -> 4x4; 9 frames -> 3 latent frames, 5 -> 2.
    spec = make_spec(Component.DIT_BLOCK, dit, task, ["96*64", "64*64"], [9, 5])
    low, opt, high = spec.profiles[0].shapes["x"]
    assert (low[1], opt[1], high[1]) == (2 * 4 * 4, 3 * 4 * 6, 3 * 4 * 6)
    assert spec.profiles[0].shapes["rope_cos"] == ((32, 1, 8), (72, 1, 8), (72, 1, 8))
    assert spec.dynamic_axes()["x"] == {1: "tokens"} and spec.dynamic_axes()["x_out"] == {1: "tokens"}
    pre = make_spec(Component.DIT_PRE, dit, task, ["96*64", "64*64"], [9, 5])
    assert pre.profiles[0].shapes["x"] == ((1, 16, 2, 8, 8), (1, 16, 3, 8, 12), (1, 16, 3, 8, 12))
    assert pre.dynamic_axes()["x"] == {2: "latent_frames", 3: scaled_axis("patch_rows", 2),
                                       4: scaled_axis("patch_cols", 2)}
    assert pre.profiles[0].shapes["time_sinusoid"] == ((1, 1, task.dit.freq_dim),) * 3
    assert spec.profiles[0].shapes["time_mod"] == ((1, 1, 6, 64),) * 3


def test_per_token_variants_give_the_time_tensors_the_token_axis(models):
    task, dit, _ = models["tiny-ti2v"]
    block = make_spec(Component.DIT_BLOCK, dit, task, ["96*64", "64*64"], [9, 5], per_token_timesteps=True)
    shared = make_spec(Component.DIT_BLOCK, dit, task, ["96*64", "64*64"], [9, 5])
    tokens = [shape[1] for shape in block.profiles[0].shapes["x"]]
    assert [shape[1] for shape in block.profiles[0].shapes["time_mod"]] == tokens
    assert block.dynamic_axes()["time_mod"] == {1: "tokens"} and "time_mod" not in shared.dynamic_axes()
    assert block.profiles[0].name == shared.profiles[0].name + ";per-token timesteps"
    pre = make_spec(Component.DIT_PRE, dit, task, ["96*64", "64*64"], [9, 5], per_token_timesteps=True)
    assert [shape[1] for shape in pre.profiles[0].shapes["time_sinusoid"]] == tokens
    assert pre.dynamic_axes()["time_emb"] == {1: "tokens"}
    post = make_spec(Component.DIT_POST, dit, task, ["96*64", "64*64"], [9, 5], per_token_timesteps=True)
    assert [shape[1] for shape in post.profiles[0].shapes["time_emb"]] == tokens
    with pytest.raises(ValueError, match="has no timesteps"):
        make_spec(Component.VAE_DECODER_STEP, models["tiny-ti2v"][2], task, ["64*64"], [9], per_token_timesteps=True)


def test_the_first_vae_steps_take_one_frame_and_no_cache(models):
    task, _, vae = models["tiny-t2v"]
    first = make_spec(Component.VAE_DECODER_FIRST_STEP, vae, task, ["64*64"], [9])
    steady = make_spec(Component.VAE_DECODER_STEP, vae, task, ["64*64"], [9])
    assert first.input_names() == ["latent"] and first.profiles[0].shapes["latent"][0] == (1, 16, 1, 8, 8)
    # Its cache out is what the steady step takes in, one for one.
    caches = [t for t in steady.inputs if t.name.startswith("cache_")]
    assert [(t.shape, t.dtype) for t in first.outputs[1:]] == [(t.shape, t.dtype) for t in caches]
    assert first.profiles[0].shapes["latent"][0][2] == 1 and first.outputs[0].shape[2] == 1
    encoder = make_spec(Component.VAE_ENCODER_FIRST_STEP, vae, task, ["64*64"], [9])
    assert encoder.input_names() == ["frames"] and encoder.profiles[0].shapes["frames"][0] == (1, 3, 1, 64, 64)


def test_bad_sizes_and_frame_counts_are_input_errors(models):
    task, dit, _ = models["tiny-t2v"]
    with pytest.raises(InputError, match="--frame-nums 8"):
        make_spec(Component.DIT_BLOCK, dit, task, ["64*64"], [8])
    with pytest.raises(InputError, match="--sizes 60\\*64"):
        make_spec(Component.DIT_BLOCK, dit, task, ["60*64"], [9])
    with pytest.raises(InputError, match="at least one"):
        make_spec(Component.DIT_BLOCK, dit, task, [], [9])


@pytest.mark.parametrize("task_name, per_token", [*((name, False) for name in TASKS), ("tiny-ti2v", True)])
def test_the_dit_graphs_compute_exactly_the_models_forward(models, task_name, per_token):
    task, dit, _ = models[task_name]
    generator = torch.Generator().manual_seed(3)
    frames, rows, cols = 3, 8, 8
    x = torch.randn(1, task.dit.out_dim, frames, rows, cols, generator=generator)
    y = (torch.randn(1, task.dit.in_dim - task.dit.out_dim, frames, rows, cols, generator=generator)
         if task.dit.in_dim != task.dit.out_dim else None)
    # ti2v with an image: the first latent frame's tokens at timestep 0, the others at t.
    timestep = (torch.tensor([731]) if not per_token
                else (torch.arange(frames * rows * cols // 4) >= rows * cols // 4)[None].float() * 731)
    context = torch.randn(1, 5, task.dit.text_dim, generator=generator)
    with torch.no_grad():
        expected = dit(x, timestep, context, y)
        padded = torch.nn.functional.pad(context, (0, 0, 0, task.dit.text_len - 5))
        tokens, time_emb, time_mod, context_emb = export_module(Component.DIT_PRE, dit)(
            *[t for t in (x, dit.time_sinusoid(timestep), padded, y) if t is not None])
        grid = (frames, rows // 2, cols // 2)
        cos, sin = rope_tables(grid, task.dit.head_dim, tokens.shape[1])
        block_graph = export_module(Component.DIT_BLOCK, dit)
        for block in dit.blocks:
            # One graph, every block: each block's tensors are inputs.
            weights = [block.state_dict(keep_vars=True)[name] for name in block_tensor_names(block)]
            (tokens,) = block_graph(tokens, time_mod, context_emb, cos, sin, *weights)
        (prediction,) = export_module(Component.DIT_POST, dit)(tokens, time_emb, torch.empty(grid))
    assert torch.equal(prediction, expected)


@pytest.mark.parametrize("task_name", ("tiny-t2v", "tiny-ti2v"))
def test_the_vae_step_graphs_compute_exactly_the_models_steps(models, task_name):
    task, _, vae = models[task_name]
    _, spatial, _ = task.vae_stride
    generator = torch.Generator().manual_seed(4)
    latent = torch.randn(1, task.vae.z_dim, 3, 4, 6, generator=generator)
    video = torch.randn(1, 3, 9, 4 * spatial, 6 * spatial, generator=generator)
    decoder_graph = export_module(Component.VAE_DECODER_STEP, vae)
    encoder_graph = export_module(Component.VAE_ENCODER, vae)
    with torch.no_grad():
        decoded, cache = vae.decode_step(latent[:, :, :1])
        encoded, encode_cache = vae.encode_step(video[:, :, :1])
        for component, x, want_out, want_cache in [
                (Component.VAE_DECODER_FIRST_STEP, latent[:, :, :1], decoded, cache),
                (Component.VAE_ENCODER_FIRST_STEP, video[:, :, :1], encoded, encode_cache)]:
            got, *got_cache = export_module(component, vae)(x)
            assert torch.equal(got, want_out) and all(map(torch.equal, got_cache, want_cache))
        for step in (1, 2):
            want, want_cache = vae.decode_step(latent[:, :, step:step + 1], cache)
            got, *got_cache = decoder_graph(latent[:, :, step:step + 1], *cache)
            assert torch.equal(got, want) and all(map(torch.equal, got_cache, want_cache))
            cache = want_cache
            chunk = video[:, :, 1 + 4 * (step - 1):1 + 4 * step]
            want, want_cache = vae.encode_step(chunk, encode_cache)
            got, *got_cache = encoder_graph(chunk, *encode_cache)
            assert torch.equal(got, want) and all(map(torch.equal, got_cache, want_cache))
            encode_cache = want_cache


def test_graphs_hold_only_the_weights_they_bake_in(models):
    """The block graph takes its weights as inputs and holds none; pre/post hold their
    embeddings or head, never the blocks; the decoder step never the encoder."""
    _, dit, vae = models["tiny-t2v"]
    held = {c: set(export_module(c, _model_for(c, dit, vae)).state_dict()) for c in Component}
    assert held[Component.DIT_BLOCK] == set()
    assert held[Component.DIT_PRE] and not any(".blocks." in k or ".head." in k for k in held[Component.DIT_PRE])
    assert held[Component.DIT_POST] == {f"dit.{k}" for k in dit.head.state_dict(prefix="head.")}
    for decoder in (Component.VAE_DECODER_STEP, Component.VAE_DECODER_FIRST_STEP):
        assert held[decoder] and not any(".encoder." in k for k in held[decoder])
    for encoder in (Component.VAE_ENCODER, Component.VAE_ENCODER_FIRST_STEP):
        assert held[encoder] and not any(".decoder." in k for k in held[encoder])
    # The model itself is untouched by the shallow copies.
    assert len(dit.blocks) == get_task("tiny-t2v").dit.num_layers and hasattr(vae, "encoder")


@pytest.mark.parametrize("scheme, weight_dtype", [("fp8", torch.float8_e4m3fn), ("int8", torch.int8)])
def test_quantized_blocks_take_their_stored_weights_and_scales_as_inputs(models, scheme, weight_dtype):
    task, dit, _ = models["tiny-t2v"]
    quantized = quantize(randomize_(WanDiT(task.dit), seed=1).eval(), scheme,
                         PrecisionPolicy(keep_first_blocks=0, keep_last_blocks=0))
    block = quantized.blocks[0]
    spec = make_spec(Component.DIT_BLOCK, block, task, ["64*64"], [9])
    dtypes = {t.name: t.dtype for t in spec.inputs}
    assert dtypes["self_attn.q.weight"] == weight_dtype and dtypes["self_attn.q.weight_scale"] == torch.float32
    inputs = spec.example_inputs()
    weights = [block.state_dict(keep_vars=True)[name] for name in block_tensor_names(block)]
    with torch.no_grad():
        (got,) = export_module(Component.DIT_BLOCK, block)(*inputs[:5], *weights)
        expected = block(*inputs[:5])
    assert torch.equal(got, expected)


def test_the_spec_follows_a_changed_architecture():
    task = get_task("tiny-t2v")
    wide = dataclasses.replace(task, dit=dataclasses.replace(task.dit, dim=96, num_heads=4))
    dit = randomize_(WanDiT(wide.dit), seed=0)
    spec = make_spec(Component.DIT_BLOCK, dit, wide, ["64*64"], [9])
    assert spec.profiles[0].shapes["x"][1] == (1, 48, 96)
    assert spec.profiles[0].shapes["rope_cos"][1] == (48, 1, 12)
