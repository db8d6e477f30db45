"""Per-token (per-row) symmetric activation quantization fused into one Triton kernel.

The W8A8 GEMMs (`torch._scaled_mm` fp8 rowwise, `torch._int_mm` int8) need every activation
row quantized with its own scale on every call. In torch that is an amax pass, a float32
temporary of the whole activation, a division, a rounding, a clamp and a cast: ~2 ms per
large GEMM of an A14B block on an H100 (issue 15). Here each row is read twice (amax, then
quantize; the second read hits L2) and written once in the 8-bit format.

The arithmetic is `wanrt.export.quantize.quantize_rows`' exactly: scale = max(amax, floor)
/ qmax in float32, values = clamp(x / scale) rounded half to even (integers) or by the cast
(float8), so the int8 outputs are bit-identical (tests/test_attention.py, interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from wanrt.export import quantize

# Triton kernels may read only constexpr globals; the floor is quantize_rows'.
AMAX_FLOOR_C = tl.constexpr(quantize.AMAX_FLOOR)
CHUNK = 1024  # columns per step of the row loops


@triton.jit
def _quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, columns, stride_x, stride_out, qmax,
                          ROUND: tl.constexpr, CHUNK: tl.constexpr):
    row = tl.program_id(0)
    offsets = tl.arange(0, CHUNK)
    amax = tl.zeros([CHUNK], dtype=tl.float32)
    for start in range(0, columns, CHUNK):
        cols = start + offsets
        x = tl.load(x_ptr + row * stride_x + cols, mask=cols < columns, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax), AMAX_FLOOR_C) / qmax
    for start in range(0, columns, CHUNK):
        cols = start + offsets
        scaled = tl.load(x_ptr + row * stride_x + cols, mask=cols < columns, other=0.0).to(tl.float32) / scale
        if ROUND:
            # Half to even, as torch.round: floor(x + 0.5), one less on an odd tie.
            rounded = tl.floor(scaled + 0.5)
            odd_tie = ((rounded - scaled) == 0.5) & ((rounded - 2.0 * tl.floor(rounded * 0.5)) != 0.0)
            scaled = tl.where(odd_tie, rounded - 1.0, rounded)
        scaled = tl.minimum(tl.maximum(scaled, -qmax), qmax)
        tl.store(out_ptr + row * stride_out + cols, scaled.to(out_ptr.dtype.element_ty), mask=cols < columns)
    tl.store(scale_ptr + row, scale)


def fused_quantize_rows(t: Tensor, qmax: float, qdtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(values `[rows, cols]` of `qdtype`, float32 scales `[rows, 1]`) of a 2-D tensor whose
    rows are contiguous; integer targets are rounded half to even, float targets by the cast."""
    if t.dim() != 2 or t.stride(-1) != 1:
        raise ValueError(f"fused_quantize_rows takes a 2-D tensor with contiguous rows, got {tuple(t.shape)} "
                         f"strides {t.stride()}")
    rows, columns = t.shape
    values = torch.empty(rows, columns, dtype=qdtype, device=t.device)
    scales = torch.empty(rows, 1, dtype=torch.float32, device=t.device)
    if rows:
        _quantize_rows_kernel[(rows,)](t, values, scales, columns, t.stride(0), values.stride(0), float(qmax),
                                       ROUND=not qdtype.is_floating_point, CHUNK=CHUNK)
    return values, scales
