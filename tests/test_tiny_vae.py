"""The tiny preview VAE (TAEHV) on random weights written in the published key layout
(madebyollin/taehv taew2_1 / taew2_2 and LightX2V's lighttaew2_x): strict loading of .pth and
.safetensors, causal chunked decode == an independent all-frames-at-once reference written
here from the published architecture, and the raw-latent convention of the lighttae files."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from wanrt.configs import WAN21_VAE, WAN22_VAE
from wanrt.errors import CheckpointError
from wanrt.loading.tiny_vae import find_tiny_vae, load_tiny_vae

PUBLISHED = {"taew2_1": (WAN21_VAE, 1), "taew2_2": (WAN22_VAE, 2)}


def _memblock(state, prefix, width, generator):
    for i, in_ch in ((0, 2 * width), (2, width), (4, width)):
        state[f"{prefix}.conv.{i}.weight"] = torch.randn(width, in_ch, 3, 3, generator=generator) / (3 * in_ch ** 0.5)
        state[f"{prefix}.conv.{i}.bias"] = torch.randn(width, generator=generator) * 0.05


def published_state(z: int, patch: int, seed: int = 0, wide_first_tgrow: bool = False) -> dict[str, torch.Tensor]:
    """Every key of a published TAEHV file for Wan, with its shape, filled with random values."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return torch.randn(*shape, generator=g) / (shape[1] * shape[2] * shape[3]) ** 0.5

    s = {"encoder.0.weight": w(64, 3 * patch * patch, 3, 3), "encoder.0.bias": torch.randn(64, generator=g) * 0.05}
    for pool, down in ((2, 3), (7, 8), (12, 13)):
        s[f"encoder.{pool}.conv.weight"] = w(64, 64 * (1 if pool == 12 else 2), 1, 1)
        s[f"encoder.{down}.weight"] = w(64, 64, 3, 3)
        for block in range(down + 1, down + 4):
            _memblock(s, f"encoder.{block}", 64, g)
    s["encoder.17.weight"], s["encoder.17.bias"] = w(z, 64, 3, 3), torch.randn(z, generator=g) * 0.05
    s["decoder.1.weight"], s["decoder.1.bias"] = w(256, z, 3, 3), torch.randn(256, generator=g) * 0.05
    for first, width, nxt, grow in ((3, 256, 128, 2 if wide_first_tgrow else 1), (9, 128, 64, 2), (15, 64, 64, 2)):
        for block in range(first, first + 3):
            _memblock(s, f"decoder.{block}", width, g)
        s[f"decoder.{first + 4}.conv.weight"] = w(width * grow, width, 1, 1)
        s[f"decoder.{first + 5}.weight"] = w(nxt, width, 3, 3)
    s["decoder.22.weight"], s["decoder.22.bias"] = w(3 * patch * patch, 64, 3, 3), torch.randn(3 * patch * patch, generator=g) * 0.05
    return s


def reference_decode(s, z: torch.Tensor, patch: int) -> torch.Tensor:
    """All frames at once, MemBlock memory = the same block's input one frame earlier."""
    def conv(x, key, padding=1):
        return F.conv2d(x, s[f"{key}.weight"], s.get(f"{key}.bias"), padding=padding)

    def memblock(x, key):
        past = torch.cat([torch.zeros_like(x[:1]), x[:-1]])
        h = conv(F.relu(conv(F.relu(conv(torch.cat([x, past], 1), f"{key}.conv.0")), f"{key}.conv.2")), f"{key}.conv.4")
        return F.relu(h + x)

    x = F.relu(conv(torch.tanh(z[0].transpose(0, 1) / 3) * 3, "decoder.1"))
    for first in (3, 9, 15):
        for block in range(first, first + 3):
            x = memblock(x, f"decoder.{block}")
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        grown = conv(x, f"decoder.{first + 4}.conv", padding=0)
        x = grown.reshape(-1, x.shape[1], *x.shape[2:])
        x = conv(x, f"decoder.{first + 5}")
    x = F.pixel_shuffle(conv(F.relu(x), "decoder.22"), patch).clamp(0, 1)
    return (x[3:] * 2 - 1).transpose(0, 1)[None]


@pytest.mark.parametrize("name", PUBLISHED)
@pytest.mark.parametrize("suffix", (".pth", ".safetensors"))
def test_published_layout_loads_strictly_and_decodes_like_the_reference(tmp_path, name, suffix):
    vae_config, patch = PUBLISHED[name]
    state = published_state(vae_config.z_dim, patch)
    path = tmp_path / f"{name}{suffix}"
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))
    model = load_tiny_vae(path, vae_config)
    assert set(model.state_dict()) == set(state)
    z = torch.randn(1, vae_config.z_dim, 3, 2, 3, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        video = model.decode(z)
        chunks = list(model.iter_decode(z))
        expected = reference_decode(state, z, patch)
    assert video.shape == (1, 3, 9, 16 * patch, 24 * patch)
    assert [c.shape[2] for c in chunks] == [1, 4, 4]
    assert (video - expected).abs().max() <= 1e-5
    assert video.min() >= -1 and video.max() <= 1
    # The encoder: 1+4k frames -> 1+k latents (the reference pads the end with the last frame).
    with torch.no_grad():
        latents = model.encode(video)
    assert latents.shape == z.shape


def test_lighttae_files_decode_raw_vae_latents(tmp_path):
    state = published_state(16, 1, seed=3)
    torch.save(state, tmp_path / "taew2_1.pth")
    torch.save(state, tmp_path / "lighttaew2_1.pth")
    normalized = load_tiny_vae(tmp_path / "taew2_1.pth", WAN21_VAE)
    raw = load_tiny_vae(tmp_path / "lighttaew2_1.pth", WAN21_VAE)
    z = torch.randn(1, 16, 2, 2, 2, generator=torch.Generator().manual_seed(6))
    mean = torch.tensor(WAN21_VAE.latent_mean).view(-1, 1, 1, 1)
    std = torch.tensor(WAN21_VAE.latent_std).view(-1, 1, 1, 1)
    with torch.no_grad():
        assert torch.allclose(raw.decode(z), normalized.decode(z * std + mean), atol=1e-6)


def test_wider_first_tgrow_keeps_its_last_frame_channels(tmp_path):
    state = published_state(16, 1, seed=4, wide_first_tgrow=True)
    torch.save(state, tmp_path / "taew2_1.pth")
    model = load_tiny_vae(tmp_path / "taew2_1.pth", WAN21_VAE)
    assert torch.equal(model.decoder[7].conv.weight, state["decoder.7.conv.weight"][256:])


def test_wrong_latent_space_and_missing_file_are_one_line_errors(tmp_path):
    torch.save(published_state(16, 1), tmp_path / "taew2_1.pth")
    with pytest.raises(CheckpointError, match="16-channel latents.*use taew2_2"):
        load_tiny_vae(tmp_path / "taew2_1.pth", WAN22_VAE)
    assert find_tiny_vae(tmp_path, WAN21_VAE) == tmp_path / "taew2_1.pth"
    with pytest.raises(CheckpointError, match="no taew2_2.pth in .*--tiny-vae PATH"):
        find_tiny_vae(tmp_path, WAN22_VAE)
