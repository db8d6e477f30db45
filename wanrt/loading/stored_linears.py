"""Linear layers whose weights arrive already quantized in a checkpoint file.

A ComfyUI / Kijai / LightX2V fp8 or int8 file, or a GGUF Q8_0 file, is executed as stored:
its 8-bit values and its own scales become wanrt's quantized Linears (`wanrt.export.quantize`)
without a round trip through bf16. The storage kinds:

* fp8 e4m3 with a per-tensor or per-output-channel scale -> `Float8Linear` (W8A8 through
  `torch._scaled_mm` where the GPU has fp8, else dequantized per matmul);
* fp8 e5m2 -> `Float8E5M2Linear`: weight-only (torch's rowwise `_scaled_mm` takes e4m3);
* int8 with a per-tensor or per-row scale -> `Int8Linear` (W8A8 through `torch._int_mm`);
* GGUF Q8_0 (int8 in blocks of 32 along the input, one fp16 scale per block) ->
  `Int8BlockLinear`: the block scales are kept exactly, so it runs weight-only.
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor, nn

from wanrt.export.quantize import (DEFAULT_POLICY, QUANT_ATTR, Float8Linear, Int8Linear, Kernel, LayerReport,
                                   QuantizedLinear, QuantReport, Scheme)


class StoredKind(str, Enum):
    FP8_E4M3 = "fp8_e4m3"
    FP8_E5M2 = "fp8_e5m2"
    INT8 = "int8"
    INT8_BLOCK32 = "int8_block32"  # GGUF Q8_0


class Float8E5M2Linear(Float8Linear):
    """fp8 e5m2 weights and float32 per-output-channel scales, computed weight-only."""

    storage_dtype = torch.float8_e5m2
    qmax = torch.finfo(torch.float8_e5m2).max  # 57344

    def kernel_for(self, device: torch.device) -> Kernel:
        return self.kernel or Kernel.DEQUANT


Q8_0_BLOCK = 32


class Int8BlockLinear(Int8Linear):
    """int8 weights with one scale per 32 consecutive inputs of a row (`[out, in/32]`), the GGUF
    Q8_0 layout: the scales stay float16 as stored (1.06 bytes per weight in all); computed
    weight-only (a W8A8 GEMM takes one scale per row)."""

    def kernel_for(self, device: torch.device) -> Kernel:
        return self.kernel or Kernel.DEQUANT

    def dequantized_weight(self) -> Tensor:
        blocks = self.weight.float().reshape(self.out_features, -1, Q8_0_BLOCK)
        return (blocks * self.weight_scale.float()[:, :, None]).reshape(self.out_features, self.in_features)


LINEAR_CLASSES: dict[StoredKind, type[QuantizedLinear]] = {
    StoredKind.FP8_E4M3: Float8Linear,
    StoredKind.FP8_E5M2: Float8E5M2Linear,
    StoredKind.INT8: Int8Linear,
    StoredKind.INT8_BLOCK32: Int8BlockLinear,
}

STORAGE_DTYPES = {kind: cls.storage_dtype for kind, cls in LINEAR_CLASSES.items()}

# The scheme a stored kind counts as (report, planner): bytes per weight are what matter.
SCHEMES = {StoredKind.FP8_E4M3: Scheme.FP8, StoredKind.FP8_E5M2: Scheme.FP8,
           StoredKind.INT8: Scheme.INT8, StoredKind.INT8_BLOCK32: Scheme.INT8}


def scale_shape(kind: StoredKind, out_features: int, in_features: int) -> tuple[int, ...]:
    if kind is StoredKind.INT8_BLOCK32:
        return (out_features, in_features // Q8_0_BLOCK)
    return (out_features,)


def scale_dtype(kind: StoredKind) -> torch.dtype:
    return torch.float16 if kind is StoredKind.INT8_BLOCK32 else torch.float32


def swap_in_stored_linears(model: nn.Module, layers: dict[str, StoredKind], source: str) -> nn.Module:
    """Replace the named `nn.Linear`s of a model built on `meta` by quantized modules of the
    stored kind (still on `meta`, filled by the loader), and leave a QuantReport on the model
    so `--precision` never quantizes it a second time."""
    for name, kind in layers.items():
        linear = model.get_submodule(name)
        with torch.device("meta"):
            weight = torch.empty(linear.out_features, linear.in_features, dtype=STORAGE_DTYPES[kind])
            scale = torch.empty(scale_shape(kind, linear.out_features, linear.in_features), dtype=scale_dtype(kind))
            bias = torch.empty(linear.out_features) if linear.bias is not None else None
            model.set_submodule(name, LINEAR_CLASSES[kind](weight, scale, bias))
    reports = tuple(
        LayerReport(name, SCHEMES[layers[name]].value, None, True, f"stored {layers[name].value} in {source}")
        if name in layers else
        LayerReport(name, Scheme.BF16.value, None, False, f"stored in high precision in {source}")
        for name, module in model.named_modules() if isinstance(module, (nn.Linear, QuantizedLinear)))
    if layers:
        kinds = list(layers.values())
        scheme = SCHEMES[max(set(kinds), key=kinds.count)]
        setattr(model, QUANT_ATTR, QuantReport(scheme, DEFAULT_POLICY, None, reports))
    return model
