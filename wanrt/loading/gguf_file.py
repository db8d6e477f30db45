"""GGUF single files (city96/ComfyUI-GGUF conversions of Wan2.2, e.g. QuantStack's) for the DiT.

Facts relied on (ComfyUI-GGUF `loader.py`, `tools/convert.py`, `tools/fix_5d_tensors.py`;
the `gguf` package's `quants.py`):

* `general.architecture` is "wan"; tensors keep the official Wan key names.
* GGUF stores dims in ggml order (fastest first): the numpy shape is the reverse.
* The 5-D patch embedding (`patch_embedding.weight`, [dim, in, 1, 2, 2]) cannot pass
  through llama.cpp's quantizer; `fix_5d_tensors.py` adds it back afterwards as F32 with its
  five dims. Tensors whose rows are not a multiple of 256 were flattened to rows of 256
  before quantization; their true shape is in `comfy.gguf.orig_shape.<name>` (INT32 array).
* Q8_0: blocks of 32 values, an fp16 scale then 32 int8 (34 bytes). It is kept as int8
  with its block scales (`stored_linears.Int8BlockLinear`).
* K-quants, blocks of 256 values: Q4_K (144 bytes: fp16 d, fp16 dmin, 12 bytes of packed
  6-bit sub-block scales and mins, 128 bytes of 4-bit values), Q5_K (176: as Q4_K plus 32
  bytes of fifth bits before the 4-bit values), Q6_K (210: 128 bytes low 4 bits, 64 bytes
  high 2 bits, 16 int8 sub-block scales, fp16 d). They are dequantized here in torch, a
  chunk of blocks at a time, to the run's dtype; other types go through the `gguf`
  package's own numpy dequantizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from wanrt.errors import CheckpointError
from wanrt.loading.files import TensorInfo, read_into
from wanrt.loading.safetensors_formats import FileFormat
from wanrt.loading.single_file import WeightFile, strip_prefix
from wanrt.loading.stored_linears import Q8_0_BLOCK, StoredKind

GGUF_MAGIC = b"GGUF"
WAN_ARCHITECTURE = "wan"
ORIG_SHAPE_FIELD = "comfy.gguf.orig_shape."
QK_K = 256
# Blocks dequantized per step: bounds the float32 temporaries to a few MB.
_CHUNK_BLOCKS = 4096


def _halves(raw: Tensor) -> Tensor:
    """fp16 values stored as byte pairs -> float32 `[n, 1]`."""
    return raw.contiguous().view(torch.float16).float()


def _shifted(raw: Tensor, groups: int, width: int, shifts: tuple[int, ...], mask: int) -> Tensor:
    """Unpack bit fields: `raw` `[n, groups * width]` -> `[n, groups * len(shifts), width]`,
    field k of each group being `(byte >> shifts[k]) & mask`."""
    shift = torch.tensor(shifts, dtype=torch.uint8).reshape(1, 1, len(shifts), 1)
    fields = torch.bitwise_right_shift(raw.reshape(raw.shape[0], groups, 1, width), shift) & mask
    return fields.reshape(raw.shape[0], groups * len(shifts), width)


def _k_scale_min(packed: Tensor) -> tuple[Tensor, Tensor]:
    """The 8 six-bit sub-block scales and mins of Q4_K/Q5_K from their 12 packed bytes: bytes
    0-3 hold scales 0-3 (low 6 bits) and the top bits of scales 4-7, bytes 4-7 the same for
    the mins, bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and mins 4-7 (high)."""
    scales, mins, low = packed.reshape(-1, 3, 4).unbind(1)
    scale = torch.cat([scales & 0x3F, (low & 0x0F) | ((scales >> 2) & 0x30)], dim=1)
    minimum = torch.cat([mins & 0x3F, (low >> 4) | ((mins >> 2) & 0x30)], dim=1)
    return scale.float(), minimum.float()


def _dequant_q4_k(blocks: Tensor) -> Tensor:
    d, dmin = _halves(blocks[:, 0:2]), _halves(blocks[:, 2:4])
    scale, minimum = _k_scale_min(blocks[:, 4:16])
    q = _shifted(blocks[:, 16:144], 4, 32, (0, 4), 0x0F).float()
    return (d[:, :, None] * scale[:, :, None] * q - dmin[:, :, None] * minimum[:, :, None]).reshape(-1, QK_K)


def _dequant_q5_k(blocks: Tensor) -> Tensor:
    d, dmin = _halves(blocks[:, 0:2]), _halves(blocks[:, 2:4])
    scale, minimum = _k_scale_min(blocks[:, 4:16])
    high = _shifted(blocks[:, 16:48], 1, 32, tuple(range(8)), 0x01)
    low = _shifted(blocks[:, 48:176], 4, 32, (0, 4), 0x0F)
    q = (low | (high << 4)).float()
    return (d[:, :, None] * scale[:, :, None] * q - dmin[:, :, None] * minimum[:, :, None]).reshape(-1, QK_K)


def _dequant_q6_k(blocks: Tensor) -> Tensor:
    low = _shifted(blocks[:, 0:128], 2, 64, (0, 4), 0x0F).reshape(-1, 8, 32)
    high = _shifted(blocks[:, 128:192], 2, 32, (0, 2, 4, 6), 0x03)
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    d = _halves(blocks[:, 208:210])
    q = ((low | (high << 4)).to(torch.int16) - 32).float().reshape(-1, 16, 16)
    return ((d * scales)[:, :, None] * q).reshape(-1, QK_K)


def _dequant_q8_0(blocks: Tensor) -> Tensor:
    return _halves(blocks[:, 0:2]) * blocks[:, 2:].contiguous().view(torch.int8).float()


# ggml type name -> (block values, block bytes, torch dequantizer)
_TORCH_DEQUANT = {
    "Q4_K": (QK_K, 144, _dequant_q4_k),
    "Q5_K": (QK_K, 176, _dequant_q5_k),
    "Q6_K": (QK_K, 210, _dequant_q6_k),
    "Q8_0": (Q8_0_BLOCK, 34, _dequant_q8_0),
}
_PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Older and smaller types, dequantized by the `gguf` package itself.
_NUMPY_DEQUANT = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K")


def dequantize_blocks(raw: Tensor, type_name: str) -> Tensor:
    """float32 values of GGUF blocks (`raw`: uint8 bytes of whole blocks), a chunk at a time."""
    block_values, block_bytes, dequant = _TORCH_DEQUANT[type_name]
    blocks = raw.reshape(-1, block_bytes)
    out = torch.empty(blocks.shape[0] * block_values)
    for first in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        chunk = dequant(blocks[first:first + _CHUNK_BLOCKS])
        out[first * block_values:first * block_values + chunk.numel()] = chunk.reshape(-1)
    return out


@dataclass(frozen=True)
class GGUFTensor:
    type_name: str
    shape: tuple[int, ...]  # the logical (torch) shape
    begin: int
    nbytes: int


def _field_text(reader, name: str) -> str | None:
    field = reader.get_field(name)
    if field is None:
        return None
    return bytes(field.parts[field.data[-1]]).decode("utf-8", errors="replace")


def _orig_shape(reader, name: str) -> tuple[int, ...] | None:
    field = reader.get_field(ORIG_SHAPE_FIELD + name)
    if field is None:
        return None
    return tuple(int(field.parts[index][0]) for index in field.data)


class GGUFFile(WeightFile):
    """A GGUF file decoded into official keys; Q8_0 Linear weights stay int8."""

    format = FileFormat.GGUF

    def __init__(self, path: Path, prefixes: tuple[str, ...] = ()) -> None:
        try:
            import gguf
        except ImportError:
            raise CheckpointError(f"{path}: reading GGUF files needs the gguf package: "
                                  "pip install 'wanrt[gguf]'") from None
        super().__init__(path)
        try:
            reader = gguf.GGUFReader(self.path)
        except (ValueError, IndexError, KeyError, OSError) as exc:
            raise CheckpointError(f"{self.path}: truncated or corrupt GGUF file ({type(exc).__name__}); "
                                  "download it again") from None
        self.architecture = _field_text(reader, "general.architecture")
        size = self.path.stat().st_size
        self._tensors: dict[str, GGUFTensor] = {}
        for tensor in reader.tensors:
            type_name = tensor.tensor_type.name
            if type_name not in _PLAIN and type_name not in _TORCH_DEQUANT and type_name not in _NUMPY_DEQUANT:
                raise CheckpointError(f"{self.path}: GGUF type {type_name} ({tensor.name}) is not supported; "
                                      "use a Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0/Q5_0 or F16 file")
            if tensor.data_offset + int(tensor.n_bytes) > size:
                raise CheckpointError(f"{self.path}: truncated GGUF file ({size} bytes, tensor {tensor.name} "
                                      "ends past it); download it again")
            shape = _orig_shape(reader, tensor.name) or tuple(int(d) for d in reversed(tensor.shape.tolist()))
            self._tensors[strip_prefix(tensor.name, prefixes)] = GGUFTensor(
                type_name, shape, int(tensor.data_offset), int(tensor.n_bytes))
        self._gguf_types = {t.tensor_type.name: t.tensor_type for t in reader.tensors}
        self.infos = {key: TensorInfo(t.shape, _PLAIN.get(t.type_name, torch.float32))
                      for key, t in self._tensors.items()}
        self.quantized = {key.removesuffix(".weight"): StoredKind.INT8_BLOCK32 for key, t in self._tensors.items()
                          if t.type_name == "Q8_0" and key.endswith(".weight") and len(t.shape) == 2
                          and t.shape[1] % Q8_0_BLOCK == 0}

    def _raw(self, tensor: GGUFTensor) -> Tensor:
        return read_into(self.fh, tensor.begin, torch.empty(tensor.nbytes, dtype=torch.uint8), self.path)

    def read(self, key: str) -> Tensor:
        tensor = self._tensors[key]
        if tensor.type_name in _PLAIN:
            return read_into(self.fh, tensor.begin, torch.empty(tensor.shape, dtype=_PLAIN[tensor.type_name]),
                             self.path)
        raw = self._raw(tensor)
        if tensor.type_name in _TORCH_DEQUANT:
            values = dequantize_blocks(raw, tensor.type_name)
        else:
            import gguf

            values = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), self._gguf_types[tensor.type_name])
                                      .astype("float32").reshape(-1))
        if values.numel() != math.prod(tensor.shape):
            raise CheckpointError(f"{self.path}: {key} holds {values.numel()} values, not {tensor.shape}")
        return values.reshape(tensor.shape)

    def read_stored(self, layer: str) -> tuple[Tensor, Tensor]:
        tensor = self._tensors[f"{layer}.weight"]
        blocks = self._raw(tensor).reshape(-1, 34)
        out_features, in_features = tensor.shape
        values = blocks[:, 2:].contiguous().view(torch.int8).reshape(out_features, in_features)
        scale = blocks[:, 0:2].contiguous().view(torch.float16).reshape(out_features, in_features // Q8_0_BLOCK)
        return values, scale

