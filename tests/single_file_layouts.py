"""Writers of tiny single files in the exact layouts of the files users download (see
`wanrt/loading/safetensors_formats.py` and `gguf_file.py` for the facts), from a float state
dict with official key names. Only the Linear weights inside the blocks are quantized, as
ComfyUI/LightX2V do; embeddings, head, norms and biases stay in high precision."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

BLOCK_LINEAR = re.compile(r"blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]\.weight|blocks\.\d+\.ffn\.[02]\.weight")
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def block_linear_weights(state: dict[str, torch.Tensor]) -> list[str]:
    return [key for key in state if BLOCK_LINEAR.fullmatch(key)]


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
         prefix: str = "") -> Path:
    save_file({prefix + key: t.contiguous() for key, t in tensors.items()}, str(path), metadata=metadata)
    return path


def _fp8_per_tensor(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    scale = weight.abs().max().float() / FP8_MAX[dtype]
    return (weight.float() / scale).clamp(-FP8_MAX[dtype], FP8_MAX[dtype]).to(dtype), scale


def _int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = weight.float().abs().amax(dim=1, keepdim=True) / 127
    return (weight.float() / scale).round().clamp(-127, 127).to(torch.int8), scale


def comfy_scaled_fp8(state, dtype=torch.float8_e4m3fn, marker: bool = True):
    """ComfyUI legacy: `scaled_fp8` marker, per-tensor `scale_weight`, `scale_input`."""
    out = {key: t.to(torch.float16) for key, t in state.items()}
    for key in block_linear_weights(state):
        layer = key.removesuffix(".weight")
        out[key], out[f"{layer}.scale_weight"] = _fp8_per_tensor(state[key], dtype)
        out[f"{layer}.scale_input"] = torch.tensor(1.0)
    if marker:
        out["scaled_fp8"] = torch.empty(0, dtype=dtype)
    return out


def comfy_quant(state, formats: dict[str, str], in_header: bool = False):
    """ComfyUI mixed precision: per-layer `comfy_quant` JSON bytes (or the header table),
    `weight_scale` (scalar for fp8, `[out, 1]` for int8_tensorwise), `input_scale`."""
    out = {key: t.to(torch.bfloat16) for key, t in state.items()}
    table = {}
    for key, fmt in formats.items():
        layer = key.removesuffix(".weight")
        if fmt == "int8_tensorwise":
            out[key], out[f"{layer}.weight_scale"] = _int8_rows(state[key])
        elif fmt in ("float8_e4m3fn", "float8_e5m2"):
            out[key], out[f"{layer}.weight_scale"] = _fp8_per_tensor(state[key], getattr(torch, fmt))
            out[f"{layer}.input_scale"] = torch.tensor(1.0)
        else:  # a format wanrt does not run: its bytes do not matter
            out[key] = state[key].to(torch.uint8)
        table[layer] = {"format": fmt}
        if not in_header:
            out[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)
    metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": table})} if in_header else None
    return out, metadata


def kijai_fp8(state, dtype=torch.float8_e4m3fn):
    """Kijai's plain casts: block Linears cast to fp8, no scale."""
    out = {key: t.to(torch.bfloat16) for key, t in state.items()}
    for key in block_linear_weights(state):
        out[key] = state[key].to(dtype)
    return out


def lightx2v(state, storage: torch.dtype):
    """LightX2V quantized: fp8 e4m3 or int8 with float32 `weight_scale` `[out, 1]`."""
    out = {key: t.to(torch.bfloat16) for key, t in state.items()}
    for key in block_linear_weights(state):
        layer = key.removesuffix(".weight")
        weight = state[key].float()
        if storage is torch.int8:
            out[key], out[f"{layer}.weight_scale"] = _int8_rows(weight)
        else:
            scale = weight.abs().amax(dim=1, keepdim=True) / 448
            out[key], out[f"{layer}.weight_scale"] = (weight / scale).to(storage), scale
    return out


# ---------------------------------------------------------------------- GGUF


def quantize_q4_k(values: np.ndarray) -> np.ndarray:
    """A plain Q4_K quantizer (per 32-value sub-block: min and scale over 15 steps, both
    6-bit relative to the block's fp16 d/dmin), packed in ggml's byte layout. gguf-py has
    no K-quant quantizer; llama.cpp's searches scales harder, this one is the simple bound."""
    blocks = values.astype(np.float32).reshape(-1, 8, 32)
    low = np.minimum(blocks.min(axis=2), 0)
    step = (blocks.max(axis=2) - low) / 15
    d = (step.max(axis=1) / 63).astype(np.float16)
    dmin = ((-low).max(axis=1) / 63).astype(np.float16)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.round(np.divide(step, d32, out=np.zeros_like(step), where=d32 > 0)), 0, 63).astype(np.uint8)
    mn = np.clip(np.round(np.divide(-low, dmin32, out=np.zeros_like(low), where=dmin32 > 0)), 0, 63).astype(np.uint8)
    unit = (d32 * sc)[:, :, None]
    q = np.round(np.divide(blocks + (dmin32 * mn)[:, :, None], unit, out=np.zeros_like(blocks), where=unit > 0))
    q = np.clip(q, 0, 15).astype(np.uint8)
    packed_scales = np.concatenate([
        sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
        (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)], axis=1).astype(np.uint8)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2),
                           packed_scales, qs], axis=1)


def write_gguf(path: Path, state, linear_type: str, five_d_patch: bool = True) -> Path:
    """A city96-style Wan GGUF: block Linears in `linear_type` (Q8_0 or Q4_K), other 2-D
    weights F16, 1-D tensors F32; rows not a multiple of 256 flattened with their shape in
    `comfy.gguf.orig_shape.*`; the 5-D patch embedding in F32 with five dims (fix_5d_tensors)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "wan")
    quantized = set(block_linear_weights(state))
    for key, tensor in state.items():
        data = tensor.float().numpy()
        if key in quantized:
            qtype = getattr(gguf.GGMLQuantizationType, linear_type)
            if linear_type == "Q4_K":
                if data.shape[-1] % 256:
                    writer.add_array(f"comfy.gguf.orig_shape.{key}", list(data.shape))
                    data = data.reshape(-1, 256)
                raw = quantize_q4_k(data).reshape(data.shape[0], -1)
            else:
                raw = gguf.quants.quantize(data, qtype)
            writer.add_tensor(key, raw, raw_dtype=qtype)
        elif key == "patch_embedding.weight" and not five_d_patch:
            writer.add_array(f"comfy.gguf.orig_shape.{key}", list(data.shape))
            writer.add_tensor(key, data.reshape(data.shape[0], -1).astype(np.float16),
                              raw_dtype=gguf.GGMLQuantizationType.F16)
        elif data.ndim == 2:
            writer.add_tensor(key, data.astype(np.float16), raw_dtype=gguf.GGMLQuantizationType.F16)
        else:
            writer.add_tensor(key, data, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
