"""The Wan2.1 and Wan2.2 causal video VAEs (official `WanVAE_` of vae2_1.py and vae2_2.py).

Both versions are built from the same blocks. Wan2.2 differs in four places: a 2x2 pixel
patchify around the whole network (12 pixel channels), a parameter-free space/time
reshuffle shortcut around every resolution stage (`AvgDown3D` / `DupUp3D`), upsampling convs
that keep their channel count (Wan2.1's halve it), and a decoder wider than the encoder.

Time is processed causally in chunks, exactly as the official code does: the encoder sees the
first frame alone and then 4 frames per step, the decoder one latent frame per step. Every
temporal convolution carries the last frames of its input over to the next step. That state
is explicit: `encode_step` and `decode_step` take the previous step's cache (`None` on the
first step) and return the next one, a flat list of tensors in call order. Every step returns
a cache of the same shapes, so all steps after the first run one fixed graph.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wanrt.configs import VAEConfig, VAEVersion
from wanrt.errors import InputError

# Encoder input frames per step after the first (one latent frame each).
FRAMES_PER_ENCODE_STEP = 4

VAECache = list[Tensor]


class StepCache:
    """Walks one step's temporal cache: slot k is the k-th cached layer in call order.

    A layer may read its slot's entry from the previous step (`previous`, None on the first
    step) and must then `store` exactly one entry for the next step.
    """

    def __init__(self, previous: Sequence[Tensor] | None) -> None:
        self.first_step = previous is None
        self._previous = previous
        self._next: VAECache = []

    def previous(self) -> Tensor | None:
        if self._previous is None:
            return None
        if len(self._next) >= len(self._previous):
            raise self._mismatch()
        return self._previous[len(self._next)]

    def store(self, entry: Tensor) -> None:
        self._next.append(entry)

    def finish(self) -> VAECache:
        if self._previous is not None and len(self._previous) != len(self._next):
            raise self._mismatch()
        return self._next

    def _mismatch(self) -> InputError:
        return InputError(f"the VAE cache has {len(self._previous)} entries, which is not what this "
                          "model's previous step returned")


class StepLayer(nn.Module):
    """Marker for layers whose forward is `forward(x, cache: StepCache)`."""


def run_layers(layers: nn.Sequential, x: Tensor, cache: StepCache) -> Tensor:
    for layer in layers:
        x = layer(x, cache) if isinstance(layer, StepLayer) else layer(x)
    return x


def framewise(layer: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Apply a 2D layer to every frame of `[B, C, T, H, W]`."""
    batch, frames = x.shape[0], x.shape[2]
    y = layer(x.transpose(1, 2).flatten(0, 1))
    return y.unflatten(0, (batch, frames)).transpose(1, 2)


class CausalConv3d(nn.Conv3d, StepLayer):
    """A 3D convolution whose output frame t sees input frames <= t.

    The official layer pads 2*padding_t frames in front and none behind. Here those frames
    are the last ones of the previous step's input, or zeros on the first step, which is what
    the official cache amounts to. Space is zero-padded symmetrically by the convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int],
                 padding: int | tuple[int, int, int] = 0,
                 stride: int | tuple[int, int, int] = 1) -> None:
        pad_t, pad_h, pad_w = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=(0, pad_h, pad_w))
        self.past_frames = 2 * pad_t

    def forward(self, x: Tensor, cache: StepCache | None = None) -> Tensor:
        if self.past_frames:
            past = cache.previous()
            x = F.pad(x, (0, 0, 0, 0, self.past_frames, 0)) if past is None else torch.cat([past, x], 2)
            # A copy, so the cache does not keep the whole padded chunk alive.
            cache.store(x[:, :, -self.past_frames:].clone())
        return super().forward(x)


class RMSNorm(nn.Module):
    """Official RMS_norm: an L2 normalisation over channels (eps 1e-12) times sqrt(C)*gamma.

    `trailing_dims` is 3 for videos `[B, C, T, H, W]`, 2 for images; it fixes gamma's shape.
    """

    def __init__(self, dim: int, trailing_dims: int) -> None:
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * trailing_dims))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class Downsample(StepLayer):
    """Halves height and width; when temporal, also halves the frames after the first."""

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        # Right and bottom only, as trained: symmetric padding would shift the grid a pixel.
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: Tensor, cache: StepCache) -> Tensor:
        x = framewise(self.resample, x)
        if self.time_conv is None:
            return x
        past = cache.previous()
        cache.store(x[:, :, -1:].clone())
        if past is None:
            # The first chunk is the first frame alone, which is its own latent frame.
            return x
        return self.time_conv(torch.cat([past, x], 2))


class Upsample(StepLayer):
    """Doubles height and width; when temporal, also doubles the frames after the first."""

    def __init__(self, dim: int, out_dim: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                      nn.Conv2d(dim, out_dim, 3, padding=1))
        self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0)) if temporal else None

    def forward(self, x: Tensor, cache: StepCache) -> Tensor:
        if self.time_conv is not None:
            x = self._double_frames(x, cache)
        return framewise(self.resample, x)

    def _double_frames(self, x: Tensor, cache: StepCache) -> Tensor:
        if cache.first_step:
            # The first latent frame decodes to one frame: time_conv is skipped and starts
            # from zeros on the next step (the official 'Rep' cache state).
            batch, channels, _, height, width = x.shape
            cache.store(x.new_zeros(batch, channels, self.time_conv.past_frames, height, width))
            return x
        y = self.time_conv(x, cache)
        # Output channels [0:C] are the even frames, [C:2C] the odd ones.
        batch, channels, frames, height, width = y.shape
        y = y.unflatten(1, (2, channels // 2)).permute(0, 2, 3, 1, 4, 5)
        return y.reshape(batch, channels // 2, 2 * frames, height, width)


class ResidualBlock(StepLayer):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        # nn.Identity holds the official dropout slot, so parameter indices match (0, 2, 3, 6).
        self.residual = nn.Sequential(
            RMSNorm(in_dim, 3), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, 3), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: StepCache) -> Tensor:
        return run_layers(self.residual, x, cache) + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention among the pixels of each frame."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, 2)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + framewise(self._attend, x)

    def _attend(self, frames: Tensor) -> Tensor:
        images, channels, height, width = frames.shape
        qkv = self.to_qkv(self.norm(frames)).flatten(2).transpose(1, 2).unsqueeze(1).contiguous()
        out = F.scaled_dot_product_attention(*qkv.chunk(3, dim=-1))
        return self.proj(out.squeeze(1).transpose(1, 2).reshape(images, channels, height, width))


class AvgDown3D(nn.Module):
    """Wan2.2 encoder shortcut: fold (time, space) factors into channels, average channel groups."""

    def __init__(self, out_channels: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.factor_t = factor_t
        self.factor_s = factor_s

    def forward(self, x: Tensor) -> Tensor:
        ft, fs = self.factor_t, self.factor_s
        # A one-frame chunk is completed with a zero frame in front.
        x = F.pad(x, (0, 0, 0, 0, -x.shape[2] % ft, 0))
        batch, channels, frames, height, width = x.shape
        x = x.reshape(batch, channels, frames // ft, ft, height // fs, fs, width // fs, fs)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(batch, self.out_channels, -1, frames // ft, height // fs, width // fs)
        return x.mean(dim=2)


class DupUp3D(nn.Module):
    """Wan2.2 decoder shortcut: repeat channels, unfold them into (time, space) factors."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.factor_t = factor_t
        self.factor_s = factor_s
        self.repeats = out_channels * factor_t * factor_s * factor_s // in_channels

    def forward(self, x: Tensor, first_step: bool) -> Tensor:
        ft, fs = self.factor_t, self.factor_s
        batch, _, frames, height, width = x.shape
        x = x.repeat_interleave(self.repeats, dim=1)
        x = x.reshape(batch, self.out_channels, ft, fs, fs, frames, height, width)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)
        x = x.reshape(batch, self.out_channels, frames * ft, height * fs, width * fs)
        # Like the main path, the first latent frame stands for one frame, not factor_t.
        return x[:, :, ft - 1:] if first_step else x


class DownStage(StepLayer):
    """Wan2.2 encoder resolution stage: residual blocks and downsampling, plus AvgDown3D."""

    def __init__(self, layers: list[nn.Module], shortcut: AvgDown3D) -> None:
        super().__init__()
        self.avg_shortcut = shortcut
        self.downsamples = nn.Sequential(*layers)

    def forward(self, x: Tensor, cache: StepCache) -> Tensor:
        return run_layers(self.downsamples, x, cache) + self.avg_shortcut(x)


class UpStage(StepLayer):
    """Wan2.2 decoder resolution stage: residual blocks and upsampling, plus DupUp3D if any."""

    def __init__(self, layers: list[nn.Module], shortcut: DupUp3D | None) -> None:
        super().__init__()
        self.avg_shortcut = shortcut
        self.upsamples = nn.Sequential(*layers)

    def forward(self, x: Tensor, cache: StepCache) -> Tensor:
        y = run_layers(self.upsamples, x, cache)
        return y if self.avg_shortcut is None else y + self.avg_shortcut(x, cache.first_step)


def middle_blocks(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def output_head(dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(dim, 3), nn.SiLU(), CausalConv3d(dim, out_dim, 3, padding=1))


def patch_size(config: VAEConfig) -> int:
    return 2 if config.version is VAEVersion.WAN2_2 else 1


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        residual_stages = config.version is VAEVersion.WAN2_2
        dims = [config.dim * mult for mult in (1, *config.dim_mult)]
        self.conv1 = CausalConv3d(3 * patch_size(config) ** 2, dims[0], 3, padding=1)
        stages: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            downsample = i < len(config.dim_mult) - 1
            temporal = downsample and config.temporal_downsample[i]
            layers: list[nn.Module] = [ResidualBlock(in_dim if j == 0 else out_dim, out_dim)
                                       for j in range(config.num_res_blocks)]
            if downsample:
                layers.append(Downsample(out_dim, temporal))
            if residual_stages:
                shortcut = AvgDown3D(out_dim, 2 if temporal else 1, 2 if downsample else 1)
                stages.append(DownStage(layers, shortcut))
            else:
                stages.extend(layers)
        self.downsamples = nn.Sequential(*stages)
        self.middle = middle_blocks(dims[-1])
        # Mean and log-variance.
        self.head = output_head(dims[-1], 2 * config.z_dim)

    def forward(self, x: Tensor, cache: StepCache) -> Tensor:
        x = self.conv1(x, cache)
        x = run_layers(self.downsamples, x, cache)
        x = run_layers(self.middle, x, cache)
        return run_layers(self.head, x, cache)


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        residual_stages = config.version is VAEVersion.WAN2_2
        temporal_upsample = config.temporal_downsample[::-1]
        dims = [config.decoder_dim * mult for mult in (config.dim_mult[-1], *config.dim_mult[::-1])]
        self.conv1 = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.middle = middle_blocks(dims[0])
        stages: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            upsample = i < len(config.dim_mult) - 1
            temporal = upsample and temporal_upsample[i]
            if i > 0 and not residual_stages:
                in_dim //= 2  # Wan2.1's upsampling conv of the previous stage halved the channels
            layers: list[nn.Module] = [ResidualBlock(in_dim if j == 0 else out_dim, out_dim)
                                       for j in range(config.num_res_blocks + 1)]
            if upsample:
                layers.append(Upsample(out_dim, out_dim if residual_stages else out_dim // 2, temporal))
            if residual_stages:
                shortcut = DupUp3D(in_dim, out_dim, 2 if temporal else 1, 2) if upsample else None
                stages.append(UpStage(layers, shortcut))
            else:
                stages.extend(layers)
        self.upsamples = nn.Sequential(*stages)
        self.head = output_head(dims[-1], 3 * patch_size(config) ** 2)

    def forward(self, x: Tensor, cache: StepCache) -> Tensor:
        x = self.conv1(x, cache)
        x = run_layers(self.middle, x, cache)
        x = run_layers(self.upsamples, x, cache)
        return run_layers(self.head, x, cache)


def patchify(x: Tensor, size: int) -> Tensor:
    """`b c f (h q) (w r) -> b (c r q) f h w`: the width offset r varies slower than q."""
    if size == 1:
        return x
    batch, channels, frames, height, width = x.shape
    x = x.reshape(batch, channels, frames, height // size, size, width // size, size)
    x = x.permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(batch, channels * size * size, frames, height // size, width // size)


def unpatchify(x: Tensor, size: int) -> Tensor:
    """Inverse of `patchify`."""
    if size == 1:
        return x
    batch, channels, frames, height, width = x.shape
    x = x.reshape(batch, channels // (size * size), size, size, frames, height, width)
    x = x.permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(batch, channels // (size * size), frames, height * size, width * size)


class WanVAE(nn.Module):
    """Video `[B, 3, 1+4k, H, W]` in [-1, 1] <-> latent `[B, z_dim, 1+k, H/s, W/s]`.

    Parameter names and shapes are those of the official `WanVAE_` of the config's version.
    Outputs follow the input's dtype and device; the latent normalisation is computed in
    float32 like the official wrapper's constants.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_size = patch_size(config)
        self.encoder = Encoder(config)
        self.conv1 = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder(config)

    def latent_scale(self, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """(mean, inv_std) float32 `[z_dim]`; inv_std is 1/std rounded to float32 once.

        Built on demand rather than stored as buffers, so a model built on the meta device and
        loaded with `assign=True` has them on the right device.
        """
        mean = torch.tensor(self.config.latent_mean, dtype=torch.float32, device=device)
        std = torch.tensor(self.config.latent_std, dtype=torch.float32, device=device)
        return mean, 1.0 / std

    def normalize_latent(self, mu: Tensor) -> Tensor:
        mean, inv_std = (t.view(-1, 1, 1, 1) for t in self.latent_scale(mu.device))
        return ((mu.float() - mean) * inv_std).to(mu.dtype)

    def denormalize_latent(self, latent: Tensor) -> Tensor:
        # Divides by inv_std, as the official decode does, rather than multiplying by std.
        mean, inv_std = (t.view(-1, 1, 1, 1) for t in self.latent_scale(latent.device))
        return (latent.float() / inv_std + mean).to(latent.dtype)

    def encode_step(self, frames: Tensor, cache: VAECache | None = None) -> tuple[Tensor, VAECache]:
        """Raw latent mean of one chunk: the first frame alone (cache None), then 4 frames."""
        if cache is None and frames.shape[2] != 1:
            raise InputError(f"the first VAE encode step takes 1 frame, got {frames.shape[2]}")
        step = StepCache(cache)
        moments = self.conv1(self.encoder(patchify(frames, self.patch_size), step))
        return moments.chunk(2, dim=1)[0], step.finish()

    def decode_step(self, latent: Tensor, cache: VAECache | None = None) -> tuple[Tensor, VAECache]:
        """Unclamped frames of one raw (denormalised) latent frame: 1 frame first, then 4."""
        if cache is None and latent.shape[2] != 1:
            raise InputError(f"the first VAE decode step takes 1 latent frame, got {latent.shape[2]}")
        step = StepCache(cache)
        frames = self.decoder(self.conv2(latent), step)
        return unpatchify(frames, self.patch_size), step.finish()

    def encode(self, video: Tensor, normalize: bool = True) -> Tensor:
        """Latent mean of `video [B, 3, T, H, W]` (log-variance discarded)."""
        self._check_video(video)
        step = FRAMES_PER_ENCODE_STEP
        chunks = [video[:, :, :1]] + [video[:, :, t:t + step] for t in range(1, video.shape[2], step)]
        cache = None
        means = []
        for chunk in chunks:
            mu, cache = self.encode_step(chunk, cache)
            means.append(mu)
        # The video's dtype, like the official wrapper's float output under bf16 autocast.
        mu = torch.cat(means, dim=2).to(video.dtype)
        return self.normalize_latent(mu) if normalize else mu

    def iter_decode(self, latent: Tensor, normalize: bool = True, clamp: bool = True) -> Iterator[Tensor]:
        """Frames of `latent [B, z_dim, L, h, w]`, one latent frame's worth at a time."""
        if latent.dim() != 5 or latent.shape[1] != self.config.z_dim:
            raise InputError(f"VAE decode expects [B, {self.config.z_dim}, L, h, w], "
                             f"got {tuple(latent.shape)}")
        z = self.denormalize_latent(latent) if normalize else latent
        cache = None
        for latent_frame in z.split(1, dim=2):
            frames, cache = self.decode_step(latent_frame, cache)
            yield frames.clamp(-1.0, 1.0) if clamp else frames

    def decode(self, latent: Tensor, normalize: bool = True, clamp: bool = True) -> Tensor:
        """Video `[B, 3, 1+4(L-1), H, W]` of `latent [B, z_dim, L, h, w]`."""
        return torch.cat(list(self.iter_decode(latent, normalize, clamp)), dim=2)

    def _check_video(self, video: Tensor) -> None:
        _, spatial, _ = self.config.stride
        if (video.dim() != 5 or video.shape[1] != 3 or (video.shape[2] - 1) % FRAMES_PER_ENCODE_STEP
                or video.shape[3] % spatial or video.shape[4] % spatial):
            raise InputError(f"VAE encode expects [B, 3, 1+4k, H, W] with H and W multiples of "
                             f"{spatial}, got {tuple(video.shape)}")
