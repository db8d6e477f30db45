"""8-bit attention in the SageAttention style, written in Triton.

The recipe (Zhang et al., "SageAttention", arXiv:2410.02367; SageAttention2 for the fp8 P·V):

* K is smoothed: the per-head mean of K over the visible tokens is subtracted. Every score of
  a query row then shifts by the same q·mean, which softmax ignores, while K's channel-wise
  outliers (shared by all tokens) no longer dominate the int8 range.
* Q and K are quantized to int8 per block of tokens (one scale per head and block, the
  attention kernel's tile): symmetric, amax / 127. Q carries the softmax scale and log2(e),
  so the kernel works in base 2.
* QK^T is an int8 x int8 -> int32 tensor-core product (exact), rescaled by the two block
  scales; the softmax is online (flash-attention) in float32.
* P·V runs in fp16 (V cast, P in [0, 1]) or in fp8 e4m3 (SM89+): P scaled by 448 to use
  e4m3's range and V quantized per channel; the kernel code is the same, only the P·V dtype
  and the two scales differ, so the CPU tests exercise the fp8 variant's logic through its
  fp16 twin (Triton's interpreter casts to float8 wrongly for some values).

A key padding mask (`key_mask [B, Lk]`, True where visible) excludes keys from the scores,
the K mean and the K/V scales. Q and K are stored quantized in `[B, H, L_padded, D_padded]`
tiles so the attention kernel reads whole blocks without bounds checks.

Tested on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1), and compiled for
sm_80/89/90 on the CPU to check the PTX's tensor-core instructions (tests/test_attention.py,
tests/kernel_compile_check.py); not yet timed on a GPU.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from wanrt.export.quantize import AMAX_FLOOR, FP8_MAX, INT8_MAX
from wanrt.kernels import PVPrecision

LOG2E = 1.4426950408889634
# Triton kernels may read only constexpr globals. A block whose values are all zero
# (padding) gets the floor as its scale instead of 0/0.
INT8_MAX_C = tl.constexpr(float(INT8_MAX))
SCALE_FLOOR_C = tl.constexpr(AMAX_FLOOR)
# The online-softmax running max starts here rather than at -inf, so a query whose first key
# blocks are all masked never computes exp2(-inf - -inf).
NEG_START_C = tl.constexpr(-1.0e30)


@triton.jit
def _program_coordinates(heads):
    """Both kernels' grid is (token blocks, batch x heads): (block, batch_head, batch, head).
    int64, so offsets past 2^31 elements (a batch of 720P activations) do not wrap."""
    batch_head = tl.program_id(1).to(tl.int64)
    return tl.program_id(0), batch_head, batch_head // heads, batch_head % heads


@triton.jit
def _quantize_blocks_kernel(x_ptr, mean_ptr, mask_ptr, out_ptr, scale_ptr,
                            seq_len, heads, head_dim, padded_len, multiplier,
                            stride_xb, stride_xl, stride_xh, stride_xd,
                            HAS_MEAN: tl.constexpr, HAS_MASK: tl.constexpr,
                            BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """One (block of tokens, batch x head): int8 values into the padded tile, one scale."""
    block, batch_head, batch, head = _program_coordinates(heads)
    rows = block * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_D)
    inside = (rows[:, None] < seq_len) & (cols[None, :] < head_dim)
    x = tl.load(x_ptr + batch * stride_xb + rows[:, None] * stride_xl + head * stride_xh
                + cols[None, :] * stride_xd, mask=inside, other=0.0).to(tl.float32)
    if HAS_MEAN:
        mean = tl.load(mean_ptr + batch_head * head_dim + cols, mask=cols < head_dim, other=0.0)
        x = x - mean[None, :]
    if HAS_MASK:
        visible = tl.load(mask_ptr + batch * seq_len + rows, mask=rows < seq_len, other=0)
        inside = inside & (visible[:, None] != 0)
    # Rows past the sequence, masked keys and padded channels are stored as zeros.
    x = tl.where(inside, x * multiplier, 0.0)
    scale = tl.maximum(tl.max(tl.abs(x)), SCALE_FLOOR_C) / INT8_MAX_C
    scaled = x / scale
    # Round half away from zero: the int8 cast truncates toward zero.
    values = (scaled + tl.where(scaled >= 0, 0.5, -0.5)).to(tl.int8)
    tl.store(out_ptr + (batch_head * padded_len + rows[:, None]) * BLOCK_D + cols[None, :], values)
    tl.store(scale_ptr + batch_head * tl.num_programs(0) + block, scale)


@triton.jit
def _attention_kernel(q_ptr, k_ptr, v_ptr, q_scale_ptr, k_scale_ptr, v_scale_ptr, mask_ptr, out_ptr,
                      q_len, kv_len, heads, head_dim, q_padded, k_padded,
                      stride_vb, stride_vl, stride_vh, stride_vd,
                      stride_ob, stride_ol, stride_oh, stride_od,
                      HAS_MASK: tl.constexpr, P_SCALE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One (block of queries, batch x head): int8 QK^T, online softmax in base 2, P·V in
    V's dtype (fp16 or fp8 e4m3) with float32 accumulation."""
    m_block, batch_head, batch, head = _program_coordinates(heads)
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + (batch_head * q_padded + offs_m[:, None]) * BLOCK_D + offs_d[None, :])
    q_scale = tl.load(q_scale_ptr + batch_head * tl.num_programs(0) + m_block)
    num_k_blocks = k_padded // BLOCK_N

    running_max = tl.full([BLOCK_M], NEG_START_C, dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n_block in range(0, num_k_blocks):
        offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.load(k_ptr + (batch_head * k_padded + offs_n[:, None]) * BLOCK_D + offs_d[None, :])
        k_scale = tl.load(k_scale_ptr + batch_head * num_k_blocks + n_block)
        scores = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32) * (q_scale * k_scale)
        visible = offs_n < kv_len
        if HAS_MASK:
            visible = visible & (tl.load(mask_ptr + batch * kv_len + offs_n, mask=offs_n < kv_len, other=0) != 0)
        scores = tl.where(visible[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        rescale = tl.exp2(running_max - new_max)
        p = tl.exp2(scores - new_max[:, None])
        running_sum = running_sum * rescale + tl.sum(p, 1)
        v = tl.load(v_ptr + batch * stride_vb + offs_n[:, None] * stride_vl + head * stride_vh
                    + offs_d[None, :] * stride_vd,
                    mask=(offs_n[:, None] < kv_len) & (offs_d[None, :] < head_dim), other=0.0)
        acc = acc * rescale[:, None] + tl.dot((p * P_SCALE).to(v.dtype), v)
        running_max = new_max

    v_scale = tl.load(v_scale_ptr + batch_head * head_dim + offs_d, mask=offs_d < head_dim, other=0.0)
    # A query that sees no key at all (every key masked) gets zeros, not 0/0.
    running_sum = tl.where(running_sum > 0, running_sum, 1.0)
    out = acc / running_sum[:, None] * (v_scale / P_SCALE)[None, :]
    tl.store(out_ptr + batch * stride_ob + offs_m[:, None] * stride_ol + head * stride_oh
             + offs_d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < head_dim))


def _block_dim(head_dim: int) -> int:
    # tl.arange needs a power of two, tl.dot at least 16.
    return max(16, triton.next_power_of_2(head_dim))


def quantize_per_block(x: Tensor, block: int, multiplier: float = 1.0, mean: Tensor | None = None,
                       key_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """int8 tiles of `x [B, L, H, D]` (any float dtype and strides) and their scales.

    Returns values `[B, H, ceil(L/block)*block, D_padded]` int8 (zeros past L, past D and on
    masked rows) and float32 scales `[B, H, ceil(L/block)]`: x*multiplier - mean ≈ values*scale.
    `mean` is `[B, H, D]` float32 (K smoothing), `key_mask [B, L]` int8, nonzero where visible.
    """
    batch, length, heads, head_dim = x.shape
    blocks = triton.cdiv(length, block)
    block_d = _block_dim(head_dim)
    values = torch.empty(batch, heads, blocks * block, block_d, dtype=torch.int8, device=x.device)
    scales = torch.empty(batch, heads, blocks, dtype=torch.float32, device=x.device)
    _quantize_blocks_kernel[(blocks, batch * heads)](
        x, mean if mean is not None else x, key_mask if key_mask is not None else x, values, scales,
        length, heads, head_dim, blocks * block, multiplier, *x.stride(),
        HAS_MEAN=mean is not None, HAS_MASK=key_mask is not None, BLOCK=block, BLOCK_D=block_d)
    return values, scales


def smoothing_mean(k: Tensor, key_mask: Tensor | None) -> Tensor:
    """The per-head mean of `k [B, L, H, D]` over its visible tokens: `[B, H, D]` float32."""
    k32 = k.float()
    if key_mask is None:
        return k32.mean(dim=1).contiguous()
    weights = key_mask[:, :, None, None].float()
    return ((k32 * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)).contiguous()


def quantize_values(v: Tensor, pv: PVPrecision, key_mask: Tensor | None) -> tuple[Tensor, Tensor, float]:
    """V as the P·V product reads it: (values `[B, L, H, D]`, per-channel scales `[B, H, D]`
    float32, the factor P is multiplied by). fp16 keeps V (scale 1, P as is); fp8 quantizes
    each channel of each head to e4m3 (amax over the visible tokens / 448) and scales P to
    e4m3's range."""
    batch, _, heads, head_dim = v.shape
    if pv is PVPrecision.FP16:
        ones = torch.ones(batch, heads, head_dim, dtype=torch.float32, device=v.device)
        return v.to(torch.float16), ones, 1.0
    visible = v.float() if key_mask is None else v.float() * key_mask[:, :, None, None]
    scales = visible.abs().amax(dim=1).clamp_min(AMAX_FLOOR) / FP8_MAX   # [B, H, D]
    values = (visible / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return token_contiguous(values), scales.contiguous(), FP8_MAX


def token_contiguous(v: Tensor) -> Tensor:
    """`v [B, L, H, D]` stored `[B, H, D, L]` (tokens contiguous), returned as a `[B, L, H, D]`
    view. 8-bit tensor-core MMAs (Hopper wgmma, SM89 mma) want both operands contiguous
    along the reduction, which for P·V is the token axis; the kernel reads V through its
    strides, and Triton specializes the stride that equals 1."""
    return v.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def check_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} are not "
                         "[B, Lq, H, D] / [B, Lk, H, D]")


def sage_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None,
                   pv: PVPrecision | str = PVPrecision.FP16, block_m: int = 128, block_n: int = 64,
                   **launch: int) -> Tensor:
    """Attention of `q [B, Lq, H, D]` over `k, v [B, Lk, H, D]` (the DiT's layout, any
    strides), `key_mask [B, Lk]` True where visible; returns `[B, Lq, H, D]` in v's dtype.

    block_m/block_n are the query/key tiles and the quantization blocks (the defaults are
    SageAttention's; tests use 16 to cover many blocks at small shapes); `launch` takes
    Triton's num_warps/num_stages.
    """
    check_shapes(q, k, v)
    values, scales, p_scale = quantize_values(v, PVPrecision(pv), key_mask)
    return attend_quantized_values(q, k, values, scales, p_scale, key_mask, block_m, block_n, out_dtype=v.dtype,
                                   **launch)


def attend_quantized_values(q: Tensor, k: Tensor, v_values: Tensor, v_scales: Tensor, p_scale: float,
                            key_mask: Tensor | None, block_m: int, block_n: int, out_dtype: torch.dtype,
                            **launch: int) -> Tensor:
    """The kernel behind `sage_attention`, given V as `quantize_values` returns it: Q and K
    are smoothed and quantized here. P is multiplied by `p_scale` and cast to V's dtype."""
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    mask = key_mask.to(torch.int8).contiguous() if key_mask is not None else None
    q_values, q_scales = quantize_per_block(q, block_m, multiplier=LOG2E / math.sqrt(head_dim))
    k_values, k_scales = quantize_per_block(k, block_n, mean=smoothing_mean(k, key_mask), key_mask=mask)
    out = torch.empty(batch, q_len, heads, head_dim, dtype=out_dtype, device=q.device)
    # 8 warps for 128-wide heads: with 4, ptxas reports the sm_90 kernel spilling 660 bytes.
    # Not tuned on a GPU yet (benchmarks/attention_bench.py --sweep).
    launch.setdefault("num_warps", 8 if head_dim >= 128 else 4)
    _attention_kernel[(q_values.shape[2] // block_m, batch * heads)](
        q_values, k_values, v_values, q_scales, k_scales, v_scales, mask if mask is not None else q_values, out,
        q_len, kv_len, heads, head_dim, q_values.shape[2], k_values.shape[2], *v_values.stride(), *out.stride(),
        HAS_MASK=mask is not None, P_SCALE=p_scale, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=q_values.shape[3], **launch)
    return out
