"""The Wan2.2-Animate DiT (official `WanAnimateModel`): the Wan DiT with pose latents added to
the video tokens, CLIP image rows in the cross-attention, and a face-motion branch (LIA
motion encoder -> FaceEncoder -> a face adapter after every fifth block).

Plain math only; the shared pieces (attention, RoPE, norms, time/text embeddings, the head)
come from `wanrt.models.dit`. Unlike the per-token Wan2.2 `WanModel`, Animate uses one time
modulation for all tokens (Wan2.1 style): `t` is `[B]`.

The official code hard-codes the widths of the sub-networks; `AnimateWidths` holds them and
`AnimateWidths.from_shapes` reads them back from a checkpoint (the tiny test models shrink
them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wanrt.configs import DiTConfig
from wanrt.errors import ConfigError
from wanrt.models.dit import (CrossAttention, DiTBlock, DiTInputs, RMSNorm, WanDiT, attention,
                              rope_tables)

# The official cross-attention slices this many CLIP rows off the front of the context:
# 256 patches of ViT-H/14 at 224 px plus the class token.
CLIP_TOKENS = 257
# A face adapter follows blocks 0, 5, 10, ... (`fuser_blocks[i // 5]`).
FACE_ADAPTER_EVERY = 5
# The official LIA motion encoder runs the face frames through in chunks of this size.
MOTION_ENCODER_CHUNK = 8


@dataclass(frozen=True)
class AnimateWidths:
    """Widths of the Animate sub-networks (official values as defaults)."""

    clip_dim: int = 1280
    # LIA appearance encoder: the 1x1 stem's channels, then each ResBlock's output channels
    # (one ResBlock per halving from the face size down to 4x4).
    lia_channels: tuple[int, ...] = (32, 64, 128, 256, 512, 512, 512, 512)
    style_dim: int = 512
    motion_dim: int = 20
    # Rows of the LIA direction matrix = width of a motion vector = FaceEncoder input.
    motion_vector_dim: int = 512
    face_encoder_dim: int = 1024
    face_encoder_heads: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "lia_channels", tuple(self.lia_channels))

    @property
    def face_size(self) -> int:
        """Side of the face crops the motion encoder takes: 4 * 2^(ResBlocks)."""
        return 2 ** (len(self.lia_channels) - 1 + 2)

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]]) -> "AnimateWidths":
        """Read the widths from a checkpoint's tensor shapes (official key names)."""
        app = "motion_encoder.enc.net_app.convs"
        try:
            resblocks = sorted(int(key.split(".")[4]) for key in shapes
                               if key.startswith(app) and key.endswith(".conv2.1.weight"))
            channels = [shapes[f"{app}.0.0.weight"][0]]
            channels += [shapes[f"{app}.{i}.conv2.1.weight"][0] for i in resblocks]
            fc = sorted(int(key.split(".")[3]) for key in shapes
                        if key.startswith("motion_encoder.enc.fc.") and key.endswith(".weight"))
            face_dim = shapes["face_encoder.conv2.conv.weight"][0]
            return cls(clip_dim=shapes["img_emb.proj.0.weight"][0], lia_channels=tuple(channels),
                       style_dim=shapes[f"{app}.{len(resblocks) + 1}.weight"][0],
                       motion_dim=shapes[f"motion_encoder.enc.fc.{fc[-1]}.weight"][0],
                       motion_vector_dim=shapes["motion_encoder.dec.direction.weight"][0],
                       face_encoder_dim=face_dim,
                       face_encoder_heads=shapes["face_encoder.conv1_local.conv.weight"][0] // face_dim)
        except (KeyError, IndexError) as exc:
            raise ConfigError(f"not a Wan-Animate DiT: no tensor {exc} to read the face-branch widths from") from None


# --- LIA motion encoder (official `motion_encoder.Generator`, StyleGAN2-style layers) ----

class EqualConv2d(nn.Module):
    """Conv2d whose stored weight is scaled by 1/sqrt(fan_in) at run time (equalised lr)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.scale = 1 / math.sqrt(in_channels * kernel_size ** 2)
        self.stride, self.padding = stride, padding

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, stride=self.stride, padding=self.padding)


class EqualLinear(nn.Module):
    """Linear with the same run-time 1/sqrt(fan_in) weight scale (no activation: the
    official motion `fc` stack is purely linear)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        self.scale = 1 / math.sqrt(in_features)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


class FusedLeakyReLU(nn.Module):
    """leaky_relu(x + bias, 0.2) * sqrt(2), with the conv's bias living here `[1, C, 1, 1]`."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.empty(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x + self.bias, 0.2) * math.sqrt(2)


class Blur(nn.Module):
    """Depthwise FIR low-pass (upfirdn2d with up = down = 1): pad, then correlate every
    channel with the flipped `[1,3,3,1] x [1,3,3,1] / 64` kernel (a persistent buffer)."""

    def __init__(self, pad: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("kernel", torch.empty(4, 4))
        self.reset_kernel()
        self.pad = pad

    @torch.no_grad()
    def reset_kernel(self) -> None:
        """The official kernel (also what the checkpoint stores); nothing to fill on meta."""
        if self.kernel.is_meta:
            return
        taps = torch.tensor([1.0, 3.0, 3.0, 1.0], device=self.kernel.device)
        kernel = torch.outer(taps, taps)
        self.kernel.copy_(kernel / kernel.sum())

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        low, high = self.pad
        x = F.pad(x.reshape(-1, 1, height, width), (low, high, low, high))
        out = F.conv2d(x, torch.flip(self.kernel, (0, 1))[None, None].to(x.dtype))
        return out.reshape(batch, channels, *out.shape[2:])


def _conv_act(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """3x3 or 1x1 conv (same padding) + FusedLeakyReLU: the official `ConvLayer`."""
    return nn.Sequential(EqualConv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                                     bias=False), FusedLeakyReLU(out_channels))


class ResBlock(nn.Module):
    """Downsampling residual block; the Blur pads are the official `ConvLayer(downsample)` ones."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = _conv_act(in_channels, in_channels, 3)
        self.conv2 = nn.Sequential(Blur((2, 2)), EqualConv2d(in_channels, out_channels, 3, stride=2, bias=False),
                                   FusedLeakyReLU(out_channels))
        self.skip = nn.Sequential(Blur((1, 1)), EqualConv2d(in_channels, out_channels, 1, stride=2, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / math.sqrt(2)


class AppearanceEncoder(nn.Module):
    """Face crop `[N, 3, S, S]` -> appearance code `[N, style_dim]` (official `EncoderApp`)."""

    def __init__(self, widths: AnimateWidths) -> None:
        super().__init__()
        channels = widths.lia_channels
        self.convs = nn.ModuleList([_conv_act(3, channels[0], 1)])
        self.convs.extend(ResBlock(c_in, c_out) for c_in, c_out in zip(channels, channels[1:]))
        # A 4x4 valid conv turns the last 4x4 map into one vector.
        self.convs.append(EqualConv2d(channels[-1], widths.style_dim, 4, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = conv(x)
        return x.flatten(1)


class LiaEncoder(nn.Module):
    def __init__(self, widths: AnimateWidths) -> None:
        super().__init__()
        self.net_app = AppearanceEncoder(widths)
        dims = [widths.style_dim] * 5 + [widths.motion_dim]
        self.fc = nn.Sequential(*(EqualLinear(d_in, d_out) for d_in, d_out in zip(dims, dims[1:])))

    def forward(self, faces: Tensor) -> Tensor:
        """Motion coefficients alpha `[N, motion_dim]`."""
        return self.fc(self.net_app(faces))


class MotionDirections(nn.Module):
    """The learned motion basis: `weight [motion_vector_dim, motion_dim]`, orthonormalised
    by QR on use (Householder, LAPACK signs, as the official `custom_qr`)."""

    def __init__(self, widths: AnimateWidths) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(widths.motion_vector_dim, widths.motion_dim))

    def basis(self) -> Tensor:
        q, _ = torch.linalg.qr(self.weight.float() + 1e-8)
        return q

    def forward(self, alpha: Tensor) -> Tensor:
        """Motion vector = sum_i alpha_i * Q[:, i], float32 (the official runs it under
        autocast(float32))."""
        return alpha.float() @ self.basis().T


class MotionEncoder(nn.Module):
    """Official `Generator`: `enc` gives the coefficients, `dec.direction` the basis."""

    def __init__(self, widths: AnimateWidths) -> None:
        super().__init__()
        self.enc = LiaEncoder(widths)
        self.dec = nn.ModuleDict({"direction": MotionDirections(widths)})

    def forward(self, faces: Tensor) -> Tensor:
        """Face crops `[N, 3, S, S]` in [-1, 1] -> motion vectors `[N, motion_vector_dim]`."""
        alpha = torch.cat([self.enc(chunk) for chunk in faces.split(MOTION_ENCODER_CHUNK)])
        return self.dec["direction"](alpha)


# --- FaceEncoder and face adapter (official `face_blocks`) ---------------------------

class CausalConv1d(nn.Module):
    """Conv1d over time with the past-only padding replicated from the first frame."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (self.conv.kernel_size[0] - 1, 0), mode="replicate"))


class FaceEncoder(nn.Module):
    """Per-frame motion vectors `[B, T, motion_vector_dim]` -> `[B, ceil(ceil(T/2)/2), heads + 1, dim]`
    face tokens: a causal conv splits each frame into `heads` streams, two stride-2 causal
    convs bring T down to the latent frame rate, and a learned padding token is appended."""

    def __init__(self, widths: AnimateWidths, dim: int) -> None:
        super().__init__()
        width, self.num_heads = widths.face_encoder_dim, widths.face_encoder_heads
        self.conv1_local = CausalConv1d(widths.motion_vector_dim, width * self.num_heads)
        self.conv2 = CausalConv1d(width, width, stride=2)
        self.conv3 = CausalConv1d(width, width, stride=2)
        self.out_proj = nn.Linear(width, dim)
        self.padding_tokens = nn.Parameter(torch.empty(1, 1, 1, dim))

    @staticmethod
    def _norm_act(x: Tensor) -> Tensor:
        """`[N, C, T]` -> LayerNorm over C (no affine, eps 1e-6) + SiLU, as `[N, T, C]`."""
        x = x.transpose(1, 2)
        return F.silu(F.layer_norm(x, x.shape[-1:], eps=1e-6))

    def forward(self, motion: Tensor) -> Tensor:
        batch = motion.shape[0]
        x = self.conv1_local(motion.transpose(1, 2))                      # [B, heads*W, T]
        x = x.unflatten(1, (self.num_heads, -1)).flatten(0, 1)            # [(B heads), W, T]
        x = self._norm_act(x).transpose(1, 2)
        x = self._norm_act(self.conv2(x)).transpose(1, 2)
        x = self.out_proj(self._norm_act(self.conv3(x)))                  # [(B heads), T', dim]
        x = x.unflatten(0, (batch, self.num_heads)).transpose(1, 2)       # [B, T', heads, dim]
        padding = self.padding_tokens.expand(batch, x.shape[1], 1, -1)
        return torch.cat([x, padding], dim=2)


class FaceBlock(nn.Module):
    """Cross-attention from each latent frame's video tokens to that frame's face tokens;
    returns the residual the official `after_transformer_block` adds to the stream."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.linear1_kv = nn.Linear(dim, dim * 2)
        self.linear1_q = nn.Linear(dim, dim)
        self.linear2 = nn.Linear(dim, dim)
        # q/k RMSNorm per head (over head_dim), unlike the DiT's whole-width QK norm.
        self.q_norm = RMSNorm(dim // num_heads, eps=1e-6)
        self.k_norm = RMSNorm(dim // num_heads, eps=1e-6)

    def forward(self, x: Tensor, face_tokens: Tensor) -> Tensor:
        """x `[B, F*S, dim]`; face_tokens `[B, F, N, dim]` (F latent frames)."""
        batch, frames = face_tokens.shape[:2]
        face = F.layer_norm(face_tokens, face_tokens.shape[-1:], eps=1e-6)
        feat = F.layer_norm(x, x.shape[-1:], eps=1e-6)
        # kv channels are laid out (2, heads, head_dim): k is the first half.
        k, v = self.linear1_kv(face).unflatten(-1, (2, self.num_heads, -1)).unbind(-3)
        q = self.linear1_q(feat).unflatten(-1, (self.num_heads, -1))
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        q = q.unflatten(1, (frames, -1)).flatten(0, 1)                    # [(B F), S, H, D]
        out = attention(q, k.flatten(0, 1), v.flatten(0, 1))
        return self.linear2(out.flatten(2).unflatten(0, (batch, frames)).flatten(1, 2))


class FaceAdapter(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_adapters: int) -> None:
        super().__init__()
        self.fuser_blocks = nn.ModuleList(FaceBlock(dim, num_heads) for _ in range(num_adapters))


# --- The DiT -------------------------------------------------------------------------

class ImageCrossAttention(CrossAttention):
    """Cross-attention over `[CLIP rows | text rows]`: one q attends to the text (k/v) and,
    separately, to the image rows (k_img/v_img); the two outputs are summed, then `o`."""

    def __init__(self, dim: int, num_heads: int, eps: float, qk_norm: bool) -> None:
        super().__init__(dim, num_heads, eps, qk_norm)
        self.k_img = nn.Linear(dim, dim)
        self.v_img = nn.Linear(dim, dim)
        self.norm_k_img = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def forward(self, x: Tensor, context: Tensor) -> Tensor:  # type: ignore[override]
        image, text = context[:, :CLIP_TOKENS], context[:, CLIP_TOKENS:]
        q = self._heads(self.norm_q(self.q(x)))
        text_out = attention(q, self._heads(self.norm_k(self.k(text))), self._heads(self.v(text)))
        image_out = attention(q, self._heads(self.norm_k_img(self.k_img(image))), self._heads(self.v_img(image)))
        return self.o(text_out.flatten(2) + image_out.flatten(2))


class AnimateBlock(DiTBlock):
    cross_attention = ImageCrossAttention


class ImageEmbedding(nn.Module):
    """CLIP features -> DiT width: LN -> Linear -> exact GELU -> Linear -> LN (eps 1e-5)."""

    def __init__(self, clip_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(clip_dim), nn.Linear(clip_dim, clip_dim), nn.GELU(),
                                  nn.Linear(clip_dim, dim), nn.LayerNorm(dim))

    def forward(self, clip_features: Tensor) -> Tensor:
        return self.proj(clip_features)


@dataclass
class AnimateInputs(DiTInputs):
    face_tokens: Tensor   # [B, latent frames, heads + 1, dim]; frame 0 (the reference) zeros


class AnimateDiT(WanDiT):
    """Official `WanAnimateModel` parameter names; `widths` are the sub-network widths."""

    block_class = AnimateBlock

    def __init__(self, config: DiTConfig, widths: AnimateWidths = AnimateWidths()) -> None:
        if config.num_layers % FACE_ADAPTER_EVERY:
            raise ConfigError(f"an Animate DiT needs a multiple of {FACE_ADAPTER_EVERY} layers, "
                              f"not {config.num_layers}")
        super().__init__(config)
        self.widths = widths
        dim = config.dim
        # Pose latents have the VAE's 16 channels, like the noise latents.
        self.pose_patch_embedding = nn.Conv3d(config.out_dim, dim, kernel_size=config.patch_size,
                                              stride=config.patch_size)
        self.img_emb = ImageEmbedding(widths.clip_dim, dim)
        self.motion_encoder = MotionEncoder(widths)
        self.face_adapter = FaceAdapter(dim, config.num_heads, config.num_layers // FACE_ADAPTER_EVERY)
        self.face_encoder = FaceEncoder(widths, dim)

    def encode_faces(self, face_pixels: Tensor) -> Tensor:
        """Face crops `[B, 3, T, S, S]` in [-1, 1] -> face tokens `[B, 1 + ceil(ceil(T/2)/2), N, dim]`,
        with an all-zero frame in front for the reference latent."""
        batch, _, frames = face_pixels.shape[:3]
        motion = self.motion_encoder(face_pixels.transpose(1, 2).flatten(0, 1))
        tokens = self.face_encoder(motion.unflatten(0, (batch, frames)).to(self.face_encoder.out_proj.weight.dtype))
        return torch.cat([torch.zeros_like(tokens[:, :1]), tokens], dim=1)

    def embed_animate(self, x: Tensor, timestep: Tensor, context: Tensor, y: Tensor, clip_features: Tensor,
                      pose_latents: Tensor, face_pixels: Tensor) -> AnimateInputs:
        """x `[B, 16, F, H, W]` (frame 0 the reference), y `[B, 20, F, H, W]`, timestep `[B]`,
        context `[B, Lc, text_dim]`, clip_features `[B, 257, clip_dim]`, pose_latents
        `[B, 16, F-1, H, W]`, face_pixels `[B, 3, T, S, S]`."""
        tokens, grid, _ = self.embed_video(x, y)
        pose = self.pose_patch_embedding(pose_latents).flatten(2).transpose(1, 2)
        frame_tokens = grid[1] * grid[2]
        # The pose is added to latent frames 1.., never to the reference frame 0.
        tokens = torch.cat([tokens[:, :frame_tokens], tokens[:, frame_tokens:] + pose.float()], dim=1)
        face_tokens = self.encode_faces(face_pixels)
        if face_tokens.shape[1] != grid[0]:
            raise ValueError(f"{face_pixels.shape[2]} face frames give {face_tokens.shape[1]} face-token "
                             f"frames but the latents have {grid[0]}")
        time_emb, time_mod = self.embed_time(self.time_sinusoid(timestep))
        context = torch.cat([self.img_emb(clip_features), self.embed_text(context)], dim=1)
        rope_cos, rope_sin = rope_tables(grid, self.config.head_dim, tokens.shape[1], device=x.device)
        return AnimateInputs(tokens, time_emb, time_mod, context, rope_cos, rope_sin, None, grid, face_tokens)

    def face_residual(self, index: int, tokens: Tensor, inputs: AnimateInputs) -> Tensor:
        """What the face adapter after block `index` adds (blocks 0, 5, 10, ... only)."""
        return self.face_adapter.fuser_blocks[index // FACE_ADAPTER_EVERY](tokens, inputs.face_tokens)

    def forward(self, x: Tensor, timestep: Tensor, context: Tensor, y: Tensor,  # type: ignore[override]
                clip_features: Tensor, pose_latents: Tensor, face_pixels: Tensor) -> Tensor:
        inputs = self.embed_animate(x, timestep, context, y, clip_features, pose_latents, face_pixels)
        tokens = inputs.tokens
        for index, block in enumerate(self.blocks):
            tokens = self.run_block(block, tokens, inputs)
            if index % FACE_ADAPTER_EVERY == 0:
                tokens = tokens + self.face_residual(index, tokens, inputs).float()
        return self.unembed(tokens, inputs)
