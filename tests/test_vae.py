"""VAE parity with the official WanVAE_ (fixtures made by the official code, float32), the
explicit step cache, and the diffusers (`AutoencoderKLWan`) layout of both VAE versions.

Tolerance everywhere: max abs error <= 1e-4 * max(1, max|reference|) (`assert_parity`); a
float32 re-implementation lands near 1e-5 (this one is bit-identical on CPU).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FIXTURES, assert_parity, load_fixture
from diffusers_layout import diffusers_vae_model
from safetensors.torch import load_file

from wanrt.configs import (
    TINY_WAN21_VAE,
    TINY_WAN22_VAE,
    WAN21_VAE,
    WAN22_VAE,
)
from wanrt.errors import CheckpointError, InputError
from wanrt.loading import diffusers_vae
from wanrt.models.vae import WanVAE

TINY = {"wan2_1": (TINY_WAN21_VAE, "Wan2.1_VAE_tiny.pth"), "wan2_2": (TINY_WAN22_VAE, "Wan2.2_VAE_tiny.pth")}
FULL = {"wan2_1": WAN21_VAE, "wan2_2": WAN22_VAE}
OUTPUTS = ("latent", "latent_unnormalized", "decoded", "decoded_unclamped")

# Shapes derived from the official constructors (vae2_1.py / vae2_2.py) at full size.
FULL_SIZE_SHAPES = {
    "wan2_1": {
        "encoder.conv1.weight": (96, 3, 3, 3, 3),                 # 3 RGB channels -> dim
        "encoder.head.2.weight": (32, 384, 3, 3, 3),              # 4*dim -> 2*z_dim
        "conv1.weight": (32, 32, 1, 1, 1),
        "decoder.conv1.weight": (384, 16, 3, 3, 3),
        "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),   # 2.1 halves channels
        "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
        "decoder.upsamples.4.shortcut.weight": (384, 192, 1, 1, 1),
        "decoder.head.2.weight": (3, 96, 3, 3, 3),
    },
    "wan2_2": {
        "encoder.conv1.weight": (160, 12, 3, 3, 3),               # 2x2-patchified RGB
        "encoder.head.2.weight": (96, 640, 3, 3, 3),
        "conv1.weight": (96, 96, 1, 1, 1),
        "decoder.conv1.weight": (1024, 48, 3, 3, 3),              # 4*dec_dim (256)
        "decoder.upsamples.0.upsamples.3.resample.1.weight": (1024, 1024, 3, 3),
        "decoder.upsamples.0.upsamples.3.time_conv.weight": (2048, 1024, 3, 1, 1),
        "decoder.upsamples.2.upsamples.0.shortcut.weight": (512, 1024, 1, 1, 1),
        "decoder.head.2.weight": (12, 256, 3, 3, 3),
    },
}


def _official_state(name: str) -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / "vae" / name / TINY[name][1], map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, WanVAE]:
    models = {}
    for name, (config, _) in TINY.items():
        model = WanVAE(config)
        model.load_state_dict(_official_state(name), strict=True)
        models[name] = model.eval()
    return models


@pytest.mark.parametrize("case", ("video", "image"))
@pytest.mark.parametrize("name", TINY)
def test_matches_official_fixtures(tiny_models, name, case):
    tensors, _ = load_fixture(f"vae/{name}/{name}")
    model = tiny_models[name]
    video, latent = tensors[f"{case}.input"][None], tensors[f"{case}.latent"][None]
    with torch.no_grad():
        ours = {
            "latent": model.encode(video),
            "latent_unnormalized": model.encode(video, normalize=False),
            "decoded": model.decode(latent),
            "decoded_unclamped": model.decode(latent, clamp=False),
        }
    for output in OUTPUTS:
        assert_parity(ours[output][0], tensors[f"{case}.{output}"], f"{name}.{case}.{output}")


@pytest.mark.parametrize("name", TINY)
def test_latent_scale_is_the_official_one(tiny_models, name):
    tensors, _ = load_fixture(f"vae/{name}/{name}")
    mean, inv_std = tiny_models[name].latent_scale()
    assert torch.equal(mean, tensors["scale.mean"])
    assert torch.equal(inv_std, tensors["scale.inv_std"])


@pytest.mark.parametrize("name", TINY)
def test_full_size_builds_on_meta_with_the_official_layout(name):
    with torch.device("meta"):
        full = WanVAE(FULL[name])
    full_state = full.state_dict()
    # The tiny official checkpoints have the real checkpoints' keys, in the same order.
    assert list(full_state) == list(_official_state(name))
    for key, shape in FULL_SIZE_SHAPES[name].items():
        assert tuple(full_state[key].shape) == shape, key
    assert not list(full.buffers()), "latent mean/std must not be state"


@pytest.mark.parametrize("name", TINY)
def test_steps_carry_an_explicit_cache_of_fixed_shapes(tiny_models, name):
    model = tiny_models[name]
    size = 2 * model.config.stride[1]
    video = torch.rand(1, 3, 9, size, size) * 2 - 1
    latent = torch.randn(1, model.config.z_dim, 3, 2, 2)
    with torch.no_grad():
        cache, shapes = None, []
        for chunk in (video[:, :, :1], video[:, :, 1:5], video[:, :, 5:]):
            _, cache = model.encode_step(chunk, cache)
            shapes.append([entry.shape for entry in cache])
        assert shapes[0] == shapes[1] == shapes[2]

        cache, shapes, chunks = None, [], []
        for t in range(latent.shape[2]):
            frames, cache = model.decode_step(model.denormalize_latent(latent[:, :, t:t + 1]), cache)
            chunks.append(frames)
            shapes.append([entry.shape for entry in cache])
        assert shapes[0] == shapes[1] == shapes[2]
        assert [chunk.shape[2] for chunk in chunks] == [1, 4, 4]
        assert torch.equal(torch.cat(chunks, 2), model.decode(latent, clamp=False))
        with pytest.raises(InputError, match="cache"):
            model.decode_step(latent[:, :, :1], cache[:-1])


@pytest.mark.parametrize("name", TINY)
def test_batch_is_per_sample(tiny_models, name):
    model = tiny_models[name]
    size = 16 * model.config.stride[1] // 8
    video = torch.rand(2, 3, 5, size, size) * 2 - 1
    with torch.no_grad():
        batched = model.encode(video)
        for i in range(2):
            assert_parity(batched[i:i + 1], model.encode(video[i:i + 1]), f"{name}.batch{i}")


def test_encode_refuses_bad_frame_counts(tiny_models):
    with pytest.raises(InputError, match="1\\+4k"):
        tiny_models["wan2_1"].encode(torch.zeros(1, 3, 4, 32, 32))


# --- diffusers layout ---------------------------------------------------------------------

@torch.no_grad()
def _randomize(model: torch.nn.Module) -> None:
    """Random weights like the fixtures' (the default init leaves every gain at 1, which
    would hide a misplaced norm)."""
    for name, param in model.named_parameters():
        if name.endswith("gamma"):
            param.copy_(1 + 0.1 * torch.randn_like(param))
        elif name.endswith("bias"):
            param.copy_(0.05 * torch.randn_like(param))
        else:
            param.copy_(torch.randn_like(param) / math.sqrt(param[0].numel()))


@pytest.mark.parametrize("name", TINY)
def test_diffusers_checkpoint_loads_and_matches_diffusers(tmp_path, name):
    diffusers = pytest.importorskip("diffusers")
    config = TINY[name][0]
    reference = diffusers_vae_model(diffusers, config).eval()
    _randomize(reference)
    reference.save_pretrained(tmp_path)

    saved = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    official = diffusers_vae.to_official(saved)
    assert diffusers_vae.config_from_diffusers(json.loads((tmp_path / "config.json").read_text())) == config
    model = WanVAE(config)
    model.load_state_dict(official, strict=True)
    model.eval()

    back = diffusers_vae.to_diffusers(official)
    assert back.keys() == saved.keys()
    assert all(torch.equal(back[key], saved[key]) for key in saved)

    size = 2 * config.stride[1]
    video = torch.rand(1, 3, 5, size, size) * 2 - 1
    latent = torch.randn(1, config.z_dim, 3, 2, 2)
    with torch.no_grad():
        # AutoencoderKLWan returns the raw posterior and decodes raw latents (clamped);
        # its pipelines apply latents_mean/std outside the model.
        assert_parity(model.encode(video, normalize=False),
                      reference.encode(video).latent_dist.mode(), f"{name}.encode")
        assert_parity(model.decode(latent, normalize=False), reference.decode(latent).sample,
                      f"{name}.decode")


@pytest.mark.parametrize("name", TINY)
def test_full_size_key_map_covers_diffusers_names(name):
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ours = WanVAE(FULL[name]).state_dict()
        theirs = diffusers_vae_model(diffusers, FULL[name]).state_dict()
    renamed = diffusers_vae.to_diffusers(ours)
    assert renamed.keys() == theirs.keys()
    assert all(renamed[key].shape == theirs[key].shape for key in theirs)


def test_wan21_key_map_agrees_with_diffusers_single_file_converter():
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    official = _official_state("wan2_1")
    assert diffusers_vae.to_diffusers(official).keys() == convert_wan_vae_to_diffusers(official).keys()


def test_unknown_keys_are_refused_by_name():
    official = _official_state("wan2_1")
    diffusers_state = diffusers_vae.to_diffusers(official)
    with pytest.raises(CheckpointError, match="encoder.extra_conv.weight"):
        diffusers_vae.to_official({**diffusers_state, "encoder.extra_conv.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="decoder.upsamples.3.other.weight"):
        diffusers_vae.to_diffusers({**official, "decoder.upsamples.3.other.weight": torch.zeros(1)})


@pytest.mark.parametrize("change", [{"attn_scales": [0.5]}, {"unknown_option": 1},
                                    {"patch_size": 2}, {"scale_factor_spatial": 16}])
def test_config_refuses_what_wanrt_cannot_run(change):
    raw = {"_class_name": "AutoencoderKLWan", "base_dim": 8, **change}
    with pytest.raises(CheckpointError):
        diffusers_vae.config_from_diffusers(raw)
