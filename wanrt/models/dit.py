"""The Wan2.2 diffusion transformer (official `WanModel` semantics for t2v, i2v and ti2v).

Plain math only. Precision follows the official code: the time embedding, the modulation
tables and the residual stream stay float32 even when the weights are bf16 (the official
model runs those parts under `autocast(float32)` and asserts on it), so bf16 runs apply
`torch.autocast` from outside and this file keeps the float32 islands explicit.

The forward is split into `embed` (patch/text/time embeddings, RoPE tables), the repeated
`blocks` and `unembed` (head + unpatchify), so that runtime transforms (streaming,
compilation, export) can wrap the repeated block alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wanrt.configs import DiTConfig, ModelType

ROPE_THETA = 10000.0


def sinusoidal_embedding(dim: int, position: Tensor) -> Tensor:
    """Timestep sinusoid, float64, laid out [cos | sin] with freq_i = 10000^(-i/half).

    float64 matters: at t≈1000 a float32 phase is off by ~1e-4 rad, which the time MLP
    amplifies into visible output differences.
    """
    half = dim // 2
    position = position.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=position.device) / half)
    angles = torch.outer(position, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels of a head given to the frame, height and width axes (official split)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_inverse_frequencies(head_dim: int, device: torch.device | None = None) -> list[Tensor]:
    """Per axis (frame, height, width), the float64 inverse frequencies of its channel pairs."""
    return [1.0 / ROPE_THETA ** (torch.arange(0, axis_dim, 2, dtype=torch.float64, device=device) / axis_dim)
            for axis_dim in rope_axis_dims(head_dim)]


def rope_angles(positions: Tensor, head_dim: int) -> Tensor:
    """Rotary angles `[L, head_dim // 2]` float64 of tokens at `positions [L, 3]` (f, h, w).

    Positions may be negative: the official S2V model multiplies by the conjugate of
    `freqs[|p|]` there, which is the angle at -|p|."""
    positions = positions.to(torch.float64)
    return torch.cat([torch.outer(positions[:, axis], inv_freq) for axis, inv_freq in
                      enumerate(rope_inverse_frequencies(head_dim, positions.device))], dim=-1)


def rope_tables(grid: tuple[int, int, int], head_dim: int, seq_len: int,
                device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """cos/sin of the 3-axis rotary angles, `[seq_len, 1, head_dim // 2]` float32.

    The angles are computed in float64 like the official complex128 tables, then rounded
    once. Rows past the F*H*W real tokens get cos=1, sin=0 so padding passes unrotated.
    """
    f, h, w = grid
    per_axis = []
    for axis_len, inv_freq, shape in zip((f, h, w), rope_inverse_frequencies(head_dim, device),
                                         ((f, 1, 1), (1, h, 1), (1, 1, w))):
        angles = torch.outer(torch.arange(axis_len, dtype=torch.float64, device=device), inv_freq)
        per_axis.append(angles.view(*shape, -1).expand(f, h, w, -1))
    angles = torch.cat(per_axis, dim=-1).reshape(f * h * w, 1, head_dim // 2)
    padding = seq_len - f * h * w
    angles = F.pad(angles, (0, 0, 0, 0, 0, padding))
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (x[2i], x[2i+1]) of `x [B, L, N, D]`; float32 out.

    Real arithmetic instead of the official complex multiply, so the graph exports to
    ONNX; the result agrees with the complex float64 version to float32 rounding.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2)


def float32_region(device: torch.device):
    """Disable autocast: the official code runs these parts under autocast(float32)."""
    return torch.autocast(device.type, enabled=False)


def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """Multi-head attention on `[B, L, N, D]` tensors; `key_mask [B, Lk]` is True where visible.

    q and k arrive float32 from RoPE; they are cast to v's dtype (the linears' compute
    dtype), as the official flash-attention call casts all three to bf16 on GPU.
    """
    q, k, v = (t.transpose(1, 2).to(v.dtype) for t in (q, k, v))
    mask = key_mask[:, None, None, :] if key_mask is not None else None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()  # one cast: on the hot path this is a [L, dim] copy
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input and weight dtypes."""

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


class SelfAttention(nn.Module):
    # The attention kernel, `(q, k, v, key_mask) -> out` on `[B, L, N, D]`: exact SDPA here.
    # A hook point for runtime transforms (wanrt.runtime.attention sets it per module to an
    # 8-bit kernel); the model never changes it.
    attention_kernel = staticmethod(attention)

    def __init__(self, dim: int, num_heads: int, eps: float, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        # QK RMSNorm runs over the whole width (all heads together), before RoPE.
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, -1))

    def rotated_qkv(self, x: Tensor, rope_cos: Tensor, rope_sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q and k normed and rotated (float32), v as projected; `[B, L, N, D]` each."""
        q = apply_rope(self._heads(self.norm_q(self.q(x))), rope_cos, rope_sin)
        k = apply_rope(self._heads(self.norm_k(self.k(x))), rope_cos, rope_sin)
        return q, k, self._heads(self.v(x))

    def forward(self, x: Tensor, rope_cos: Tensor, rope_sin: Tensor,
                key_mask: Tensor | None) -> Tensor:
        q, k, v = self.rotated_qkv(x, rope_cos, rope_sin)
        return self.o(self.attention_kernel(q, k, v, key_mask).flatten(2))


class CrossAttention(SelfAttention):
    """Attention from video tokens to the (always text_len long, unmasked) text tokens."""

    def forward(self, x: Tensor, context: Tensor) -> Tensor:  # type: ignore[override]
        q = self._heads(self.norm_q(self.q(x)))
        k = self._heads(self.norm_k(self.k(context)))
        v = self._heads(self.v(context))
        return self.o(attention(q, k, v).flatten(2))


class DiTBlock(nn.Module):
    """One transformer block. `time_mod [B, L|1, 6, dim]` is the float32 time projection."""

    # A variant with image conditioning (Animate's CLIP rows) swaps this class.
    cross_attention = CrossAttention

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        dim, eps = config.dim, config.eps
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, config.num_heads, eps, config.qk_norm)
        # Official naming: norm3 (affine) precedes cross-attention, norm2 precedes the FFN.
        self.norm3 = (FP32LayerNorm(dim, eps, elementwise_affine=True)
                      if config.cross_attn_norm else nn.Identity())
        self.cross_attn = self.cross_attention(dim, config.num_heads, eps, config.qk_norm)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(config.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.empty(1, 6, dim))

    def forward(self, x: Tensor, time_mod: Tensor, context: Tensor, rope_cos: Tensor,
                rope_sin: Tensor, key_mask: Tensor | None = None) -> Tensor:
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (
            (self.modulation.float().unsqueeze(0) + time_mod).unbind(dim=2))
        y = self.self_attn(self.norm1(x).float() * (1 + scale_sa) + shift_sa,
                           rope_cos, rope_sin, key_mask)
        x = x.float() + y.float() * gate_sa
        x = x + self.cross_attn(self.norm3(x), context).float()
        y = self.ffn(self.norm2(x).float() * (1 + scale_ff) + shift_ff)
        return x + y.float() * gate_ff


class Head(nn.Module):
    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.norm = FP32LayerNorm(config.dim, config.eps, elementwise_affine=False)
        self.head = nn.Linear(config.dim, math.prod(config.patch_size) * config.out_dim)
        self.modulation = nn.Parameter(torch.empty(1, 2, config.dim))

    def forward(self, x: Tensor, time_emb: Tensor) -> Tensor:
        shift, scale = (self.modulation.float().unsqueeze(0) + time_emb.unsqueeze(2)).unbind(dim=2)
        with float32_region(x.device):
            modulated = self.norm(x).float() * (1 + scale) + shift
            return self.head(modulated.to(self.head.weight.dtype)).float()


@dataclass
class DiTInputs:
    """Everything the blocks need, produced once per forward by `WanDiT.embed`."""

    tokens: Tensor        # [B, seq_len, dim] float32, zero rows past the real tokens
    time_emb: Tensor      # [B, L|1, dim] float32, feeds the head
    time_mod: Tensor      # [B, L|1, 6, dim] float32, feeds every block
    context: Tensor       # [B, text_len, dim]
    rope_cos: Tensor      # [seq_len, 1, head_dim/2] float32
    rope_sin: Tensor
    key_mask: Tensor | None  # [B, seq_len] bool, None when nothing is padded
    grid: tuple[int, int, int]


class WanDiT(nn.Module):
    """Wan2.2 DiT with the official parameter names (`WanModel`)."""

    # Hints read by runtime transforms (streaming, compilation); the model ignores them.
    repeated_blocks = "blocks"
    keep_in_fp32 = ("time_embedding", "time_projection", "head", "modulation")
    # Variants (Animate, S2V) build their blocks from a subclass.
    block_class: type[nn.Module] = DiTBlock

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, dim, kernel_size=config.patch_size,
                                         stride=config.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(config.text_dim, dim),
                                            nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(),
                                            nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList(self.block_class(config) for _ in range(config.num_layers))
        self.head = Head(config)

    def embed(self, x: Tensor, timestep: Tensor, context: Tensor, y: Tensor | None = None,
              seq_len: int | None = None) -> DiTInputs:
        """x `[B, C, F, H, W]`; timestep int64 `[B]` or per-token `[B, seq_len]`;
        context `[B, Lc <= text_len, text_dim]`; y `[B, C_y, F, H, W]` for i2v."""
        tokens, grid, key_mask = self.embed_video(x, y, seq_len)
        time_emb, time_mod = self.embed_time(self.time_sinusoid(timestep))
        context = self.embed_text(context)
        rope_cos, rope_sin = rope_tables(grid, self.config.head_dim, tokens.shape[1], device=x.device)
        return DiTInputs(tokens, time_emb, time_mod, context, rope_cos, rope_sin, key_mask, grid)

    def embed_video(self, x: Tensor, y: Tensor | None = None,
                    seq_len: int | None = None) -> tuple[Tensor, tuple[int, int, int], Tensor | None]:
        """(tokens `[B, seq_len, dim]` float32, patch grid, key mask or None when unpadded)."""
        if y is not None:
            x = torch.cat([x, y], dim=1)
        tokens = self.patch_embedding(x)
        grid = tuple(tokens.shape[2:])
        tokens = tokens.flatten(2).transpose(1, 2)
        num_tokens = tokens.shape[1]
        seq_len = num_tokens if seq_len is None else seq_len
        if seq_len < num_tokens:
            raise ValueError(f"seq_len {seq_len} is shorter than the {num_tokens} video tokens")
        # Contiguous: the transposed view would make every residual add of every block read
        # strided memory (5-8% of a CPU forward, issue 15). Padding copies already.
        tokens = F.pad(tokens.float(), (0, 0, 0, seq_len - num_tokens)).contiguous()
        key_mask = None
        if seq_len > num_tokens:
            key_mask = (torch.arange(seq_len, device=x.device) < num_tokens).expand(x.shape[0], -1)
        return tokens, grid, key_mask

    def time_sinusoid(self, timestep: Tensor) -> Tensor:
        """The float64 sinusoid of `[B]` or per-token `[B, L]` timesteps, rounded once to the
        time MLP's dtype: `[B, 1|L, freq_dim]`. A `[B]` timestep is the same for every token:
        it is embedded once and broadcast over L, which equals the official per-token
        expansion exactly."""
        steps = timestep if timestep.dim() == 2 else timestep[:, None]
        sinusoid = sinusoidal_embedding(self.config.freq_dim, steps.flatten())
        return sinusoid.to(self.time_embedding[0].weight.dtype).unflatten(0, steps.shape)

    def embed_time(self, sinusoid: Tensor) -> tuple[Tensor, Tensor]:
        """(time_emb `[B, 1|L, dim]`, time_mod `[B, 1|L, 6, dim]`), float32."""
        with float32_region(sinusoid.device):
            weight_dtype = self.time_embedding[0].weight.dtype
            time_emb = self.time_embedding(sinusoid).float()
            time_mod = self.time_projection(time_emb.to(weight_dtype)).float()
        return time_emb, time_mod.unflatten(2, (6, self.config.dim))

    def embed_text(self, context: Tensor) -> Tensor:
        # The official model zero-pads the text to text_len BEFORE the embedding MLP, and
        # cross-attention is unmasked: the padded rows (W2·gelu(b1)+b2) are attended to.
        cfg = self.config
        if context.shape[1] > cfg.text_len:
            raise ValueError(f"context has {context.shape[1]} tokens, more than text_len {cfg.text_len}")
        return self.text_embedding(F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1])))

    def run_block(self, block: nn.Module, tokens: Tensor, inputs: DiTInputs) -> Tensor:
        return block(tokens, inputs.time_mod, inputs.context, inputs.rope_cos, inputs.rope_sin,
                     inputs.key_mask)

    def unembed(self, tokens: Tensor, inputs: DiTInputs) -> Tensor:
        """Head + unpatchify: `[B, L, dim]` -> `[B, out_dim, F, H, W]` float32."""
        return self.unpatchify(self.head(tokens, inputs.time_emb), inputs.grid)

    def unpatchify(self, out: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """Per-token head outputs `[B, L, prod(patch) * out_dim]` -> `[B, out_dim, F, H, W]`
        float32; rows past the F*H*W real tokens (padding) are dropped."""
        f, h, w = grid
        p, q, r = self.config.patch_size
        # Per-token channels are laid out (p, q, r, c) with c fastest ('fhwpqrc->cfphqwr').
        out = out[:, :f * h * w].float().reshape(-1, f, h, w, p, q, r, self.config.out_dim)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(out.shape[0], self.config.out_dim, f * p, h * q, w * r)

    def forward(self, x: Tensor, timestep: Tensor, context: Tensor, y: Tensor | None = None,
                seq_len: int | None = None) -> Tensor:
        if self.config.model_type is ModelType.I2V and y is None:
            raise ValueError("the i2v DiT needs the conditioning input y")
        inputs = self.embed(x, timestep, context, y, seq_len)
        tokens = inputs.tokens
        for block in self.blocks:
            tokens = self.run_block(block, tokens, inputs)
        return self.unembed(tokens, inputs)
