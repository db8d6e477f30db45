"""Spatially tiled causal VAE decode/encode (wanrt.runtime.vae_tiling) on the official tiny
VAEs of both versions: one tile == untiled bit for bit, 2x2 tiles within a stated budget.

Budget (random-weight VAEs, 8x8 latent, 2 latent frames, 2x2 tiles of 6x6 with 4 latent
pixels of overlap), measured max / mean abs error against the untiled VAE: decode in the
[-1, 1] range Wan2.1 0.75 / 0.079, Wan2.2 0.88 / 0.106 (budget 0.95 / 0.12); encode
(latents up to 1.6 / 3.9) Wan2.1 0.39 / 0.035, Wan2.2 0.77 / 0.071 (budget 0.8 / 0.08). Random weights are the
worst case: the middle attention block sees the whole frame and nothing is spatially smooth;
the error shrinks as the overlap grows, which the tests check.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FIXTURES

from wanrt.configs import TINY_WAN21_VAE, TINY_WAN22_VAE
from wanrt.errors import InputError
from wanrt.loading.checkpoint import load_vae
from wanrt.runtime.vae_tiling import TiledVAE, VAETiling, tile_starts

TINY = {"wan2_1": (TINY_WAN21_VAE, "Wan2.1_VAE_tiny.pth"), "wan2_2": (TINY_WAN22_VAE, "Wan2.2_VAE_tiny.pth")}
LATENT_HW = 8


@pytest.fixture(scope="module", params=TINY)
def vae(request):
    config, file = TINY[request.param]
    return load_vae(FIXTURES / "vae" / request.param / file, config)


def _latent(vae) -> torch.Tensor:
    return torch.randn(1, vae.config.z_dim, 2, LATENT_HW, LATENT_HW, generator=torch.Generator().manual_seed(1))


def _video(vae) -> torch.Tensor:
    side = LATENT_HW * vae.config.stride[1]
    return torch.rand(1, 3, 5, side, side, generator=torch.Generator().manual_seed(2)) * 2 - 1


def test_tiles_cover_the_frame_with_equal_sizes():
    assert tile_starts(12, 8, 4) == [0, 4]
    assert tile_starts(20, 8, 2) == [0, 6, 12]
    assert tile_starts(6, 8, 2) == [0]
    assert VAETiling(8, 8, 4).count(12, 12) == 4
    with pytest.raises(InputError, match="overlap"):
        VAETiling(4, 8, 4)


@torch.no_grad()
def test_one_tile_is_the_untiled_decode_and_encode_bit_for_bit(vae):
    latent, video = _latent(vae), _video(vae)
    whole = VAETiling(LATENT_HW, LATENT_HW, 0)
    assert torch.equal(TiledVAE(vae, whole).decode(latent), vae.decode(latent))
    assert torch.equal(TiledVAE(vae, whole).decode(latent, clamp=False), vae.decode(latent, clamp=False))
    assert torch.equal(TiledVAE(vae, whole).encode(video), vae.encode(video))
    # The chunks callers stream are the untiled ones too.
    tiled_chunks = list(TiledVAE(vae, whole).iter_decode(latent))
    assert [c.shape for c in tiled_chunks] == [c.shape for c in vae.iter_decode(latent)]


@torch.no_grad()
def test_2x2_tiles_decode_within_budget_and_more_overlap_helps(vae):
    latent = _latent(vae)
    reference = vae.decode(latent)
    errors = {}
    # The last tile is shifted back to end at the frame edge, so (5, 2) overlaps by 2 and
    # (6, 4) by 4 latent pixels.
    for tile, overlap in ((5, 2), (6, 4)):
        tiling = VAETiling(tile, tile, overlap)
        assert tiling.count(LATENT_HW, LATENT_HW) == 4
        tiled = TiledVAE(vae, tiling).decode(latent)
        assert tiled.shape == reference.shape
        errors[overlap] = (tiled - reference).abs()
    assert errors[4].max() <= 0.95 and errors[4].mean() <= 0.12
    assert errors[4].mean() < errors[2].mean()


@torch.no_grad()
def test_2x2_tiles_encode_within_budget(vae):
    video = _video(vae)
    reference = vae.encode(video)
    tiled = TiledVAE(vae, VAETiling(6, 6, 4)).encode(video)
    error = (tiled - reference).abs()
    assert tiled.shape == reference.shape
    assert error.max() <= 0.8 and error.mean() <= 0.08
