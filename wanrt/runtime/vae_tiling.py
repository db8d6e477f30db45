"""Spatially tiled causal VAE decode and encode: a wrapper around a built `WanVAE`.

The frame is cut into overlapping tiles in latent space. Each tile runs the VAE's own causal
time chunks (`decode_step` / `encode`) with its own temporal cache, from the first latent
frame to the last, before the next tile starts: the device holds one tile's activations and
one tile's cache, never the whole frame's (the cache alone is ~9.5 kB per output pixel for
the Wan2.1 decoder in float32, 8.2 GiB at 1280x720). Tiles are blended linearly across the
overlaps into a float32 accumulator on `output_device` (the host by default), so a 720P
video fits a 24 GiB card.

This is how diffusers' `AutoencoderKLWan.tiled_decode` works too (tile by tile, the causal
cache cleared per tile, linear blends over the overlap); unlike it, tiles here are chosen in
latent units by the planner (`wanrt.runtime.planner.choose_vae_tiling`) from the VRAM budget,
all tiles of a frame have the same size (the last one is shifted back, not cut), and the
blend weights are normalised, so corners where four tiles meet sum to one.

With one tile covering the frame the weights are all one and the result is bit for bit the
untiled `WanVAE.decode` / `encode`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from wanrt.errors import InputError
from wanrt.models.vae import FRAMES_PER_ENCODE_STEP, WanVAE


@dataclass(frozen=True)
class VAETiling:
    """Tile size and overlap in latent units (one latent pixel = `stride` output pixels)."""

    tile_height: int
    tile_width: int
    overlap: int

    def __post_init__(self) -> None:
        if self.tile_height < 1 or self.tile_width < 1 or self.overlap < 0:
            raise InputError(f"VAE tiles need a positive size and a non-negative overlap, got {self}")
        if self.overlap >= min(self.tile_height, self.tile_width):
            raise InputError(f"VAE tile overlap {self.overlap} must be smaller than the tile "
                             f"({self.tile_height}x{self.tile_width} latent pixels)")

    def count(self, latent_height: int, latent_width: int) -> int:
        """How many tiles cover a `latent_height x latent_width` frame."""
        return (len(tile_starts(latent_height, self.tile_height, self.overlap))
                * len(tile_starts(latent_width, self.tile_width, self.overlap)))

    def describe(self, stride: int) -> str:
        return f"{self.tile_width * stride}x{self.tile_height * stride} px, {self.overlap * stride} px overlap"


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of equal tiles covering `[0, length)`; the last one ends at `length`."""
    if tile >= length:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step))
    return starts + [length - tile]


def _axis_weights(starts: list[int], tile: int, length: int, scale: int) -> list[Tensor]:
    """Per tile, its blend weight along one axis in output units (`scale` per latent unit).

    Over an overlap of n output pixels the outgoing tile falls as (n-j)/(n+1) and the
    incoming one rises as (j+1)/(n+1), so the two sum to one everywhere.
    """
    size = min(tile, length) * scale
    weights = []
    for index, start in enumerate(starts):
        weight = torch.ones(size, dtype=torch.float32)
        if index > 0:
            lead = (starts[index - 1] + tile - start) * scale
            weight[:lead] = torch.arange(1, lead + 1, dtype=torch.float32) / (lead + 1)
        if index + 1 < len(starts):
            trail = (start + tile - starts[index + 1]) * scale
            weight[size - trail:] = torch.arange(trail, 0, -1, dtype=torch.float32) / (trail + 1)
        weights.append(weight)
    return weights


@dataclass(frozen=True)
class _Tile:
    rows: slice       # latent rows
    cols: slice       # latent columns
    weight: Tensor    # [tile_h * scale, tile_w * scale] blend weight in output units


def _tiles(latent_hw: tuple[int, int], tiling: VAETiling, scale: int) -> list[_Tile]:
    height, width = latent_hw
    tile_h, tile_w = min(tiling.tile_height, height), min(tiling.tile_width, width)
    row_starts = tile_starts(height, tile_h, tiling.overlap)
    col_starts = tile_starts(width, tile_w, tiling.overlap)
    row_weights = _axis_weights(row_starts, tile_h, height, scale)
    col_weights = _axis_weights(col_starts, tile_w, width, scale)
    return [_Tile(slice(r, r + tile_h), slice(c, c + tile_w), rw[:, None] * cw[None, :])
            for r, rw in zip(row_starts, row_weights) for c, cw in zip(col_starts, col_weights)]


def _scaled(rows: slice, scale: int) -> slice:
    return slice(rows.start * scale, rows.stop * scale)


class TiledVAE:
    """`WanVAE`'s decode/encode interface, computed tile by tile (see the module doc).

    `output_device` is where the blended result accumulates (float32); the VAE and each
    tile's computation stay on the VAE's device.
    """

    def __init__(self, vae: WanVAE, tiling: VAETiling, output_device: torch.device | str = "cpu") -> None:
        self.vae = vae
        self.config = vae.config
        self.tiling = tiling
        self.output_device = torch.device(output_device)
        self.spatial_stride = vae.config.stride[1]

    def decode(self, latent: Tensor, normalize: bool = True, clamp: bool = True) -> Tensor:
        """Video `[B, 3, 1+4(L-1), H, W]` of `latent [B, z_dim, L, h, w]`, on `output_device`."""
        if latent.dim() != 5 or latent.shape[1] != self.config.z_dim:
            raise InputError(f"VAE decode expects [B, {self.config.z_dim}, L, h, w], got {tuple(latent.shape)}")
        z = self.vae.denormalize_latent(latent) if normalize else latent
        batch, _, latent_frames, height, width = z.shape
        scale = self.spatial_stride
        frames = 1 + FRAMES_PER_ENCODE_STEP * (latent_frames - 1)
        total = torch.zeros(batch, 3, frames, height * scale, width * scale, device=self.output_device)
        weight_sum = torch.zeros(height * scale, width * scale, device=self.output_device)
        for tile in _tiles((height, width), self.tiling, scale):
            weight = tile.weight.to(self.output_device)
            rows, cols = _scaled(tile.rows, scale), _scaled(tile.cols, scale)
            cache, start = None, 0
            for latent_frame in z[:, :, :, tile.rows, tile.cols].split(1, dim=2):
                decoded, cache = self.vae.decode_step(latent_frame, cache)
                stop = start + decoded.shape[2]
                total[:, :, start:stop, rows, cols] += weight * decoded.to(self.output_device, torch.float32)
                start = stop
            weight_sum[rows, cols] += weight
        video = (total / weight_sum).to(latent.dtype)
        return video.clamp(-1.0, 1.0) if clamp else video

    def iter_decode(self, latent: Tensor, normalize: bool = True, clamp: bool = True) -> Iterator[Tensor]:
        """The decoded video in `WanVAE.iter_decode`'s pieces (1 frame, then 4 per latent
        frame), once every tile is done: callers that stream frames to the host keep working."""
        video = self.decode(latent, normalize, clamp)
        yield video[:, :, :1]
        yield from video[:, :, 1:].split(FRAMES_PER_ENCODE_STEP, dim=2)

    def encode(self, video: Tensor, normalize: bool = True) -> Tensor:
        """Latent mean of `video [B, 3, T, H, W]`: each tile encoded causally on its own,
        the latents blended across the overlaps."""
        self.vae._check_video(video)
        batch, _, frames, height, width = video.shape
        scale = self.spatial_stride
        latent_h, latent_w = height // scale, width // scale
        latent_frames = (frames - 1) // FRAMES_PER_ENCODE_STEP + 1
        total = torch.zeros(batch, self.config.z_dim, latent_frames, latent_h, latent_w, device=self.output_device)
        weight_sum = torch.zeros(latent_h, latent_w, device=self.output_device)
        for tile in _tiles((latent_h, latent_w), self.tiling, 1):
            crop = video[:, :, :, _scaled(tile.rows, scale), _scaled(tile.cols, scale)]
            mu = self.vae.encode(crop, normalize=False)
            weight = tile.weight.to(self.output_device)
            total[:, :, :, tile.rows, tile.cols] += weight * mu.to(self.output_device, torch.float32)
            weight_sum[tile.rows, tile.cols] += weight
        mu = (total / weight_sum).to(video.dtype)
        return self.vae.normalize_latent(mu) if normalize else mu

    def to(self, device: torch.device | str) -> "TiledVAE":
        self.vae.to(device)
        return self
