"""The CLIP image tower Wan2.2-Animate conditions on: the visual half of open-clip's
XLM-RoBERTa ViT-H/14 (official `wan/modules/animate/clip.py`), run as the official
`CLIPModel.visual` does: bicubic resize, OpenAI mean/std, and the tokens after all but the
last transformer block (`use_31_block`), with no post-norm and no head.

Plain math only; attention and the float32 LayerNorm come from `wanrt.models.dit`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wanrt.models.dit import FP32LayerNorm, attention

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipVisionConfig:
    """ViT-H/14 at 224 px (official values). `num_layers` counts the blocks that run: the
    checkpoint's last block is unused by `use_31_block`."""

    image_size: int = 224
    patch_size: int = 14
    dim: int = 1280
    mlp_ratio: int = 4
    num_heads: int = 16
    num_layers: int = 31
    eps: float = 1e-5

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


class ClipAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.to_qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(2)
        return self.proj(attention(q, k, v).flatten(2))


class ClipBlock(nn.Module):
    """Pre-norm transformer block with an exact-GELU MLP."""

    def __init__(self, config: ClipVisionConfig) -> None:
        super().__init__()
        dim, hidden = config.dim, config.dim * config.mlp_ratio
        self.norm1 = FP32LayerNorm(dim, config.eps)
        self.attn = ClipAttention(dim, config.num_heads)
        self.norm2 = FP32LayerNorm(dim, config.eps)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ClipVision(nn.Module):
    """Pixels `[B, 3, S, S]` (normalised) -> tokens `[B, 1 + patches, dim]` (official names
    under `visual.`)."""

    def __init__(self, config: ClipVisionConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.dim
        # pre_norm=True in ViT-H: the patch conv has no bias.
        self.patch_embedding = nn.Conv2d(3, dim, config.patch_size, stride=config.patch_size, bias=False)
        self.cls_embedding = nn.Parameter(torch.empty(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.empty(1, config.num_tokens, dim))
        self.pre_norm = FP32LayerNorm(dim, config.eps)
        self.transformer = nn.Sequential(*(ClipBlock(config) for _ in range(config.num_layers)))

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_embedding.expand(x.shape[0], -1, -1), x], dim=1)
        return self.transformer(self.pre_norm(x + self.pos_embedding))

    def preprocess(self, frames: Tensor) -> Tensor:
        """Frames `[N, 3, H, W]` in [-1, 1] -> normalised `[N, 3, S, S]`: bicubic resize
        (align_corners=False, no antialias) first, then [0, 1] and mean/std, as the official."""
        size = (self.config.image_size,) * 2
        x = F.interpolate(frames, size=size, mode="bicubic", align_corners=False) * 0.5 + 0.5
        mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device)[:, None, None]
        std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device)[:, None, None]
        return (x - mean) / std

    def encode(self, frames: Tensor) -> Tensor:
        """The DiT's `clip_fea`: frames `[N, 3, H, W]` in [-1, 1] -> `[N, tokens, dim]`."""
        return self(self.preprocess(frames).to(self.patch_embedding.weight.dtype))
