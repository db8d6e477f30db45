"""TAEHV, the tiny video autoencoder (madebyollin/taehv), for fast previews of Wan latents.

Published weights: `taew2_1` (16 latent channels: Wan2.1's VAE, used by the A14B models)
and `taew2_2` (48 channels, 2x2 pixel patches: Wan2.2's VAE, used by TI2V-5B), as .pth or
.safetensors. Parameter names are those files' keys: `encoder.<i>` / `decoder.<i>` index
the two flat layer sequences below, so the layer lists must stay in this exact order.
LightX2V ships the same architecture and key layout as `lighttaew2_1` / `lighttaew2_2`;
those decode the VAE's raw latents, whereas taew2_x decode the diffusion model's
(normalised) latents directly.

Architecture (all convs 3x3, padding 1, unless noted; every frame is a 2D image):
- MemBlock(c): relu(conv(c) . relu . conv(c) . relu . conv(2c -> c) of [x_t, x_{t-1}] + x_t),
  where x_{t-1} is the block's input one frame earlier (zeros before the first frame). This
  one-frame memory is the only way information moves forward in time.
- TPool(c, s): s consecutive frames stacked on channels, 1x1 conv (s*c -> c, no bias).
- TGrow(c, s): 1x1 conv (c -> s*c, no bias) unstacked into s consecutive frames.
- Encoder: conv(3p^2 -> 64), relu, then 3 x [TPool(64, 2/2/1), conv stride 2 (no bias),
  3 MemBlocks], conv(64 -> z). Input frames in [0, 1], padded at the end with copies of the
  last frame to a multiple of 4; 4 frames per latent frame.
- Decoder: tanh(x/3)*3, conv(z -> 256), relu, then for widths 256, 128, 64:
  3 MemBlocks, nearest 2x upsample, TGrow(1/2/2), conv -> next width (no bias); relu,
  conv(64 -> 3p^2), pixel shuffle p, clamp to [0, 1]. A latent frame gives 4 frames; the
  first 3 frames of the video are dropped, so L latent frames give 1 + 4(L-1) frames,
  exactly as Wan's VAE.

Time is processed causally in chunks: every MemBlock carries its last input frame to the
next chunk (`TinyCache`), so decoding one latent frame at a time equals decoding all at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wanrt.errors import InputError

# Input frames per latent frame (two TPools of stride 2) and back (two TGrows of stride 2).
TIME_STRIDE = 4
WIDTHS = (256, 128, 64, 64)
ENCODER_WIDTH = 64

# Per layer, the previous chunk's last input frame (MemBlocks only; None elsewhere).
TinyCache = list[Tensor | None]


@dataclass(frozen=True)
class TinyVAEConfig:
    latent_channels: int
    patch_size: int
    # The latent normalisation of the Wan VAE this tiny VAE stands in for. taew2_x decode
    # the diffusion model's (normalised) latents; lighttae variants (`raw_latents`) decode
    # the VAE's raw latents, so normalised inputs are denormalised first.
    latent_mean: tuple[float, ...]
    latent_std: tuple[float, ...]
    raw_latents: bool = False

    @property
    def z_dim(self) -> int:
        return self.latent_channels

    @property
    def stride(self) -> tuple[int, int, int]:
        return TIME_STRIDE, 8 * self.patch_size, 8 * self.patch_size


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)


class SoftClamp(nn.Module):
    """Squashes latents smoothly into (-3, 3)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        # Indices 0, 2, 4 are the published keys (`conv.0.weight`, ...); skip is the identity
        # at equal widths, which is all TAEHV uses.
        self.conv = nn.Sequential(conv3x3(2 * channels, channels), nn.ReLU(), conv3x3(channels, channels),
                                  nn.ReLU(), conv3x3(channels, channels))

    def forward(self, x: Tensor, past: Tensor) -> Tensor:
        return F.relu(self.conv(torch.cat([x, past], dim=1)) + x)


class TPool(nn.Module):
    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels * stride, channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        frames, channels, height, width = x.shape
        return self.conv(x.reshape(frames // self.stride, self.stride * channels, height, width))


class TGrow(nn.Module):
    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        frames, channels, height, width = x.shape
        return self.conv(x).reshape(frames * self.stride, channels, height, width)


def _encoder(config: TinyVAEConfig) -> nn.Sequential:
    width = ENCODER_WIDTH
    layers: list[nn.Module] = [conv3x3(3 * config.patch_size ** 2, width), nn.ReLU()]
    for time_stride in (2, 2, 1):
        layers += [TPool(width, time_stride), conv3x3(width, width, stride=2, bias=False),
                   MemBlock(width), MemBlock(width), MemBlock(width)]
    return nn.Sequential(*layers, conv3x3(width, config.latent_channels))


def _decoder(config: TinyVAEConfig) -> nn.Sequential:
    layers: list[nn.Module] = [SoftClamp(), conv3x3(config.latent_channels, WIDTHS[0]), nn.ReLU()]
    for width, next_width, time_stride in zip(WIDTHS[:-1], WIDTHS[1:], (1, 2, 2)):
        layers += [MemBlock(width), MemBlock(width), MemBlock(width), nn.Upsample(scale_factor=2),
                   TGrow(width, time_stride), conv3x3(width, next_width, bias=False)]
    return nn.Sequential(*layers, nn.ReLU(), conv3x3(WIDTHS[-1], 3 * config.patch_size ** 2))


def run_causal(layers: nn.Sequential, x: Tensor, cache: TinyCache | None) -> tuple[Tensor, TinyCache]:
    """Apply `layers` to the frames `x [T, C, H, W]` of one chunk, continuing `cache`."""
    next_cache: TinyCache = []
    for index, layer in enumerate(layers):
        if isinstance(layer, MemBlock):
            before = cache[index] if cache is not None else torch.zeros_like(x[:1])
            x, last = layer(x, torch.cat([before, x[:-1]])), x[-1:]
            next_cache.append(last)
        else:
            x = layer(x)
            next_cache.append(None)
    return x, next_cache


class TinyVAE(nn.Module):
    """Wan latents `[B, z, L, h, w]` <-> video `[B, 3, 1+4(L-1), H, W]` in [-1, 1], with
    `WanVAE`'s decode/encode interface (so previews and the pipeline can swap them)."""

    def __init__(self, config: TinyVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = _encoder(config)
        self.decoder = _decoder(config)

    def _change_space(self, latent: Tensor, normalized: bool, to_normalized: bool) -> Tensor:
        """`latent` between the normalised space (the diffusion model's) and the VAE's raw one."""
        if normalized == to_normalized:
            return latent
        mean = torch.tensor(self.config.latent_mean, device=latent.device).view(-1, 1, 1, 1)
        std = torch.tensor(self.config.latent_std, device=latent.device).view(-1, 1, 1, 1)
        converted = (latent.float() - mean) / std if to_normalized else latent.float() * std + mean
        return converted.to(latent.dtype)

    def decode_step(self, latent: Tensor, cache: TinyCache | None = None) -> tuple[Tensor, TinyCache]:
        """Unclamped frames `[1, 3, 4, H, W]` (about [0, 1]) of one latent frame `[1, z, 1, h, w]`."""
        frames, cache = run_causal(self.decoder, latent[0].transpose(0, 1), cache)
        return F.pixel_shuffle(frames, self.config.patch_size).transpose(0, 1)[None], cache

    def iter_decode(self, latent: Tensor, normalize: bool = True, clamp: bool = True) -> Iterator[Tensor]:
        """Frames in [-1, 1] of `latent [1, z, L, h, w]` (normalised unless `normalize` is
        False): 1 frame for the first latent frame, then 4 each, like `WanVAE.iter_decode`."""
        if latent.dim() != 5 or latent.shape[0] != 1 or latent.shape[1] != self.config.latent_channels:
            raise InputError(f"the tiny VAE decodes [1, {self.config.latent_channels}, L, h, w], "
                             f"got {tuple(latent.shape)}")
        cache = None
        z = self._change_space(latent, normalize, not self.config.raw_latents)
        for index, latent_frame in enumerate(z.split(1, dim=2)):
            frames, cache = self.decode_step(latent_frame, cache)
            if clamp:
                frames = frames.clamp(0.0, 1.0)
            # The decoder's first TIME_STRIDE - 1 frames precede the video.
            yield (frames[:, :, TIME_STRIDE - 1:] if index == 0 else frames) * 2 - 1

    def decode(self, latent: Tensor, normalize: bool = True, clamp: bool = True) -> Tensor:
        """Video `[B, 3, 1+4(L-1), H, W]` of `latent [B, z, L, h, w]`."""
        return torch.cat([torch.cat(list(self.iter_decode(sample, normalize, clamp)), dim=2)
                          for sample in latent.split(1)])

    def encode(self, video: Tensor, normalize: bool = True) -> Tensor:
        """Latents of `video [B, 3, T, H, W]` in [-1, 1]: normalised (the diffusion model's),
        or the VAE's raw latents when `normalize` is False."""
        stride = self.config.stride[1]
        if video.dim() != 5 or video.shape[1] != 3 or video.shape[3] % stride or video.shape[4] % stride:
            raise InputError(f"the tiny VAE encodes [B, 3, T, H, W] with H and W multiples of {stride}, "
                             f"got {tuple(video.shape)}")
        latents = []
        for sample in video.split(1):
            frames = F.pixel_unshuffle(sample[0].transpose(0, 1) * 0.5 + 0.5, self.config.patch_size)
            frames = torch.cat([frames, frames[-1:].expand(-frames.shape[0] % TIME_STRIDE, -1, -1, -1)])
            cache, parts = None, []
            for chunk in frames.split(TIME_STRIDE):
                part, cache = run_causal(self.encoder, chunk, cache)
                parts.append(part)
            latents.append(torch.cat(parts).transpose(0, 1))
        return self._change_space(torch.stack(latents), not self.config.raw_latents, normalize)
