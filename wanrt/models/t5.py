"""The umt5-xxl text encoder (official `T5Encoder` semantics, encoder only).

Module and parameter names reproduce the official checkpoint
`models_t5_umt5-xxl-enc-bf16.pth`, so it loads with `strict=True`. The numerics follow the
official code step by step, which matters when the weights are bf16/fp16: the RMS norm
accumulates in float32, the tanh-GELU is the explicit formula (one rounding per op),
attention logits are unscaled and soft-maxed in float32, and fp16 residuals are clamped.
Dropout is left out: it is the identity in eval mode and this is an inference runtime.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wanrt.configs import T5Config
from wanrt.errors import ConfigError

# Relative distances at or beyond this share the last bucket (fixed in the official code).
RELATIVE_MAX_DISTANCE = 128


def clamp_fp16_overflow(x: Tensor) -> Tensor:
    """Pull ±inf back into range when an fp16 residual stream has overflowed.

    The official code clamps to `max - 1000` only if some value is inf. Clamping to `max`
    otherwise leaves every finite value unchanged, so the data-dependent branch becomes a
    `where` and needs no host synchronisation.
    """
    if x.dtype != torch.float16:
        return x
    largest = torch.finfo(torch.float16).max
    bound = torch.where(torch.isinf(x).any(), largest - 1000.0, largest).to(x.dtype)
    return torch.clamp(x, min=-bound, max=bound)


class TanhGELU(nn.Module):
    """GELU with the tanh approximation, written out op by op as in the official code.

    `F.gelu(approximate="tanh")` rounds once; the official bf16 runs round after every op.
    """

    def forward(self, x: Tensor) -> Tensor:
        inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))
        return 0.5 * x * (1.0 + torch.tanh(inner))


class T5LayerNorm(nn.Module):
    """RMS norm without mean subtraction or bias; the statistic is taken in float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Multiplying by the float32 rsqrt promotes x to float32; it is rounded back only
        # for half-precision weights, exactly like the official module.
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.type_as(self.weight)
        return self.weight * x


class RelativePositionBias(nn.Module):
    """Learned per-head bias indexed by bucketed relative distance (bidirectional)."""

    def __init__(self, num_buckets: int, num_heads: int) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def bucket(self, relative_position: Tensor) -> Tensor:
        """Bucket of `key - query`: half the buckets for each sign, exact for small
        distances, logarithmic up to RELATIVE_MAX_DISTANCE, then saturated."""
        half = self.num_buckets // 2
        sign_offset = (relative_position > 0).long() * half
        distance = relative_position.abs()
        max_exact = half // 2
        # Same float32 op order as the official code so bucket boundaries agree exactly;
        # distance 0 gives log(0) = -inf here, but those entries take the exact branch.
        log_scaled = (torch.log(distance.float() / max_exact)
                      / math.log(RELATIVE_MAX_DISTANCE / max_exact) * (half - max_exact))
        far_bucket = (max_exact + log_scaled.long()).clamp(max=half - 1)
        return sign_offset + torch.where(distance < max_exact, distance, far_bucket)

    def forward(self, length: int) -> Tensor:
        """Bias `[1, heads, length, length]` for self-attention over `length` tokens."""
        positions = torch.arange(length, device=self.embedding.weight.device)
        relative_position = positions.unsqueeze(0) - positions.unsqueeze(1)
        bias = self.embedding(self.bucket(relative_position))
        return bias.permute(2, 0, 1).unsqueeze(0)


class T5Attention(nn.Module):
    """Multi-head self-attention without the 1/sqrt(d) logit scaling (T5 folds it into q)."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int) -> None:
        super().__init__()
        if dim_attn % num_heads:
            raise ConfigError(f"T5 dim_attn {dim_attn} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: Tensor, key_mask: Tensor, position_bias: Tensor) -> Tensor:
        """`x [B, L, dim]`, `key_mask [B, L]` (0 = padding), `position_bias [1, N, L, L]`."""
        batch = x.size(0)
        q, k, v = (proj(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
                   for proj in (self.q, self.k, self.v))
        # Padding keys get the dtype's most negative value (replacing, not adding to, the
        # position bias), so they receive exactly zero weight after the softmax.
        bias = torch.where(key_mask.view(batch, 1, 1, -1) == 0,
                           torch.finfo(x.dtype).min, position_bias.to(x.dtype))
        logits = q @ k.transpose(-1, -2) + bias
        weights = F.softmax(logits.float(), dim=-1).type_as(logits)
        out = (weights @ v).transpose(1, 2).flatten(2)
        return self.o(out)


class T5FeedForward(nn.Module):
    """Gated-GELU MLP: `fc2(fc1(x) * gelu(gate(x)))`."""

    def __init__(self, dim: int, dim_ffn: int) -> None:
        super().__init__()
        # A Sequential so the gate projection is stored as `gate.0`, the official key.
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), TanhGELU())
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class T5Block(nn.Module):
    """Pre-norm self-attention and feed-forward, each added to the residual stream."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.norm1 = T5LayerNorm(config.dim)
        self.attn = T5Attention(config.dim, config.dim_attn, config.num_heads)
        self.norm2 = T5LayerNorm(config.dim)
        self.ffn = T5FeedForward(config.dim, config.dim_ffn)
        # umt5 learns a position bias per layer; T5 v1.x shares one across the encoder.
        self.pos_embedding = (None if config.shared_pos
                              else RelativePositionBias(config.num_buckets, config.num_heads))

    def forward(self, x: Tensor, mask: Tensor, shared_bias: Tensor | None) -> Tensor:
        bias = shared_bias if self.pos_embedding is None else self.pos_embedding(x.size(1))
        x = clamp_fp16_overflow(x + self.attn(self.norm1(x), mask, bias))
        return clamp_fp16_overflow(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    """Token ids and attention mask -> final hidden states `[B, L, dim]`.

    Every position gets an output, padding included; only the keys are masked, so the
    valid rows do not depend on how much padding follows them.
    """

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.pos_embedding = (RelativePositionBias(config.num_buckets, config.num_heads)
                              if config.shared_pos else None)
        self.blocks = nn.ModuleList(T5Block(config) for _ in range(config.num_layers))
        self.norm = T5LayerNorm(config.dim)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        x = self.token_embedding(ids)
        shared_bias = None if self.pos_embedding is None else self.pos_embedding(ids.size(1))
        for block in self.blocks:
            x = block(x, mask, shared_bias)
        return self.norm(x)
