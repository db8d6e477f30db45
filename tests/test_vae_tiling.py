"""Spatially tiled causal VAE decode/encode (wanrt.runtime.vae_tiling) on the official tiny
VAEs of both versions: one tile == untiled bit for bit, 2x2 tiles within a stated budget.

Budget (random-weight VAEs, 8x8 latent, 2 latent frames, 2x2 tiles of 6x6 with 4 latent
pixels of overlap), measured max / mean abs error against the untiled VAE: decode in the
[-1, 1] range Wan2.1 0.75 / 0.079, Wan2.2 0.88 / 0.106 (budget 0.95 / 0.12); encode
(latents up to 1.6 / 3.9) Wan2.1 0.39 / 0.035, Wan2.2 0.77 / 0.071 (budget 0.8 / 0.08). Random weights are the
worst case: the middle attention block sees the whole frame and nothing is spatially smooth;
the error shrinks as the overlap grows (2 latent pixels of overlap: mean 0.127 / 0.163).
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
def case(request):
    """A tiny VAE, its inputs, and its untiled outputs (computed once per VAE)."""
    config, file = TINY[request.param]
    vae = load_vae(FIXTURES / "vae" / request.param / file, config)
    side = LATENT_HW * config.stride[1]
    latent = torch.randn(1, config.z_dim, 2, LATENT_HW, LATENT_HW, generator=torch.Generator().manual_seed(1))
    video = torch.rand(1, 3, 5, side, side, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        return vae, latent, video, vae.decode(latent), vae.encode(video)


def test_tiles_cover_the_frame_with_equal_sizes():
    assert tile_starts(12, 8, 4) == [0, 4]
    assert tile_starts(20, 8, 2) == [0, 6, 12]
    assert tile_starts(6, 8, 2) == [0]
    assert VAETiling(8, 8, 4).count(12, 12) == 4
    with pytest.raises(InputError, match="overlap"):
        VAETiling(4, 8, 4)


@torch.no_grad()
def test_one_tile_is_the_untiled_decode_and_encode_bit_for_bit(case):
    vae, latent, video, decoded, encoded = case
    whole = TiledVAE(vae, VAETiling(LATENT_HW, LATENT_HW, 0))
    chunks = list(whole.iter_decode(latent))
    # The chunks callers stream have the untiled shapes: 1 frame, then 4 per latent frame.
    assert [c.shape[2] for c in chunks] == [1, 4]
    assert torch.equal(torch.cat(chunks, dim=2), decoded)
    assert torch.equal(whole.encode(video), encoded)


@torch.no_grad()
def test_2x2_tiles_within_budget(case):
    vae, latent, video, decoded, encoded = case
    # The last tile is shifted back to end at the frame edge: 6-pixel tiles overlap by 4.
    tiled = TiledVAE(vae, VAETiling(6, 6, 4))
    assert tiled.tiling.count(LATENT_HW, LATENT_HW) == 4
    decode_error = (tiled.decode(latent) - decoded).abs()
    encode_error = (tiled.encode(video) - encoded).abs()
    assert decode_error.max() <= 0.95 and decode_error.mean() <= 0.12
    assert encode_error.max() <= 0.8 and encode_error.mean() <= 0.08
    # Not trivially equal: the tiles see less context than the whole frame.
    assert decode_error.mean() > 1e-3
