"""Single-file safetensors formats: how the files in circulation describe their 8-bit layers.

Facts each decoder relies on (ComfyUI `comfy/ops.py`, `comfy/quant_ops.py`, QUANTIZATION.md;
kijai/ComfyUI-WanVideoWrapper `nodes_model_loading.py`; LightX2V `tools/convert`):

* ComfyUI legacy scaled fp8 (`*_fp8_scaled.safetensors`, Kijai's `*_fp8_e4m3fn_scaled_KJ`):
  a marker tensor `scaled_fp8` (empty; its dtype is the fp8 flavour; Kijai's files may
  omit it), and per quantized Linear `<layer>.weight` in float8_e4m3fn/e5m2 with
  `<layer>.scale_weight`, a float32 scalar: weight = fp8 * scale_weight. An optional
  `<layer>.scale_input` (float32 scalar) is a static activation scale.
* ComfyUI `comfy_quant` (mixed precision): per quantized Linear `<layer>.comfy_quant`, a
  uint8 tensor holding JSON bytes such as `{"format": "float8_e4m3fn"}`, or the same per-layer
  table in the header's `__metadata__["_quantization_metadata"]`
  (`{"format_version": "1.0", "layers": {"<layer>": {"format": ...}}}`); scales in
  `<layer>.weight_scale` (float32; a scalar, or `[out, 1]` rows for int8_tensorwise) and an
  optional `<layer>.input_scale`. Formats: float8_e4m3fn, float8_e5m2, int8_tensorwise
  (and nvfp4, mxfp8, int8_blockwise, convrot/w4 variants, which wanrt refuses).
* Kijai plain `*_fp8_e4m3fn.safetensors` / `*_fp8_e5m2.safetensors`: the bf16 weights cast to
  fp8, no scale (scale 1).
* LightX2V quantized single files (`*_scaled_fp8_e4m3_lightx2v_4step`, `*_int8_lightx2v_4step`):
  `<layer>.weight` in float8_e4m3fn or int8 with `<layer>.weight_scale`, float32 `[out, 1]`
  (symmetric per output channel); no comfy_quant marker.

wanrt quantizes activations per token at run time, so static input scales are read past.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Mapping

import torch
from torch import Tensor

from wanrt.errors import CheckpointError
from wanrt.loading.files import TensorInfo
from wanrt.loading.stored_linears import StoredKind


class FileFormat(str, Enum):
    """What a single checkpoint file holds; recorded in the sidecar."""

    FLOAT = "safetensors"                   # fp32/fp16/bf16, any of the known key prefixes
    COMFY_SCALED_FP8 = "comfy-scaled-fp8"   # `scaled_fp8` marker / `.scale_weight`
    COMFY_QUANT = "comfy-quant"             # `.comfy_quant` / `_quantization_metadata`
    FP8_CAST = "fp8-unscaled"               # Kijai's plain fp8 casts
    LIGHTX2V = "lightx2v-quant"             # `.weight_scale` per channel, no marker
    GGUF = "gguf"
    PTH = "pth"                             # the official weights-only .pth (VAE, T5)


SCALED_FP8_MARKER = "scaled_fp8"
COMFY_QUANT_METADATA = "_quantization_metadata"
# ComfyUI text-encoder files may carry the sentencepiece model as a uint8 tensor.
TOKENIZER_TENSORS = ("spiece_model",)

# comfy_quant format name -> the storage wanrt runs it as.
COMFY_FORMATS = {
    "float8_e4m3fn": StoredKind.FP8_E4M3,
    "float8_e5m2": StoredKind.FP8_E5M2,
    "int8_tensorwise": StoredKind.INT8,
}
FP8_KINDS = {torch.float8_e4m3fn: StoredKind.FP8_E4M3, torch.float8_e5m2: StoredKind.FP8_E5M2}
_QUANTIZED_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8)


@dataclass(frozen=True)
class FormatKeys:
    """The companion keys of one quantized `<layer>.weight` in a format."""

    scale: str | None                   # suffix of the weight scale; None: scale 1
    ignored: tuple[str, ...] = ()       # read past (static input scales, markers)


FORMAT_KEYS = {
    FileFormat.COMFY_SCALED_FP8: FormatKeys("scale_weight", ("scale_input",)),
    FileFormat.COMFY_QUANT: FormatKeys("weight_scale", ("input_scale", "comfy_quant")),
    FileFormat.FP8_CAST: FormatKeys(None),
    FileFormat.LIGHTX2V: FormatKeys("weight_scale"),
    FileFormat.FLOAT: FormatKeys(None),
}


def detect_safetensors_format(infos: Mapping[str, TensorInfo], metadata: Mapping[str, str]) -> FileFormat:
    """Recognise the format from the header alone (keys, dtypes, metadata)."""
    suffixes = {key.rsplit(".", 1)[-1] for key in infos}
    if SCALED_FP8_MARKER in infos or "scale_weight" in suffixes:
        return FileFormat.COMFY_SCALED_FP8
    if "comfy_quant" in suffixes or COMFY_QUANT_METADATA in metadata:
        return FileFormat.COMFY_QUANT
    if "weight_scale" in suffixes:
        return FileFormat.LIGHTX2V
    if any(info.dtype in FP8_KINDS for info in infos.values()):
        return FileFormat.FP8_CAST
    return FileFormat.FLOAT


@dataclass(frozen=True)
class QuantizedWeight:
    """One Linear weight stored in 8 bits: where its values and scale are."""

    kind: StoredKind
    weight_key: str
    scale_key: str | None


def _layer_format(config: Mapping) -> str:
    """A layer's format name; a rotated (ConvRot: weights multiplied by a Hadamard matrix,
    `"convrot": true`) layer is named apart, as wanrt does not undo the rotation."""
    return f"{config['format']}+convrot" if config.get("convrot") else config["format"]


def _comfy_layer_formats(infos: Mapping[str, TensorInfo], metadata: Mapping[str, str],
                         read_small: Callable[[str], Tensor], source: str) -> dict[str, str]:
    """layer -> comfy_quant format name, from the per-layer tensors and/or the header table."""
    formats: dict[str, str] = {}
    if COMFY_QUANT_METADATA in metadata:
        try:
            table = json.loads(metadata[COMFY_QUANT_METADATA])
            formats.update({layer: _layer_format(entry) for layer, entry in table["layers"].items()})
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{source}: unreadable {COMFY_QUANT_METADATA} in the header") from None
    for key in infos:
        if key.endswith(".comfy_quant"):
            raw = read_small(key).to(torch.uint8).numpy().tobytes().rstrip(b"\0")
            try:
                formats[key.removesuffix(".comfy_quant")] = _layer_format(json.loads(raw))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{source}: {key} is not comfy_quant JSON") from None
    return formats


def quantized_weights(fmt: FileFormat, infos: Mapping[str, TensorInfo], metadata: Mapping[str, str],
                      read_small: Callable[[str], Tensor], source: str) -> dict[str, QuantizedWeight]:
    """layer -> its quantized weight, for every 8-bit `<layer>.weight` of the file. Refuses a
    layer format wanrt cannot run natively, naming it."""
    keys = FORMAT_KEYS[fmt]
    declared = _comfy_layer_formats(infos, metadata, read_small, source) if fmt is FileFormat.COMFY_QUANT else {}
    unsupported = sorted({name for name in declared.values() if name not in COMFY_FORMATS})
    if unsupported:
        raise CheckpointError(
            f"{source}: comfy_quant format {', '.join(unsupported)} is not supported (wanrt runs "
            f"{', '.join(COMFY_FORMATS)}); use an fp8/int8 or bf16 file of this model")
    found: dict[str, QuantizedWeight] = {}
    for key, info in infos.items():
        if not key.endswith(".weight") or info.dtype not in _QUANTIZED_DTYPES:
            continue
        layer = key.removesuffix(".weight")
        kind = FP8_KINDS.get(info.dtype, StoredKind.INT8)
        if layer in declared and COMFY_FORMATS[declared[layer]] is not kind:
            raise CheckpointError(f"{source}: {layer} is declared {declared[layer]} but stored as {info.dtype}")
        scale_key = f"{layer}.{keys.scale}" if keys.scale else None
        if scale_key not in infos:
            scale_key = None  # a plain fp8 cast: scale 1
            if kind is StoredKind.INT8:
                raise CheckpointError(f"{source}: int8 weight {key} has no scale; not a format wanrt knows")
        found[layer] = QuantizedWeight(kind, key, scale_key)
    return found


def companion_keys(fmt: FileFormat, infos: Mapping[str, TensorInfo],
                   layers: Mapping[str, QuantizedWeight]) -> set[str]:
    """Keys that describe quantized weights instead of being model tensors: scales, static
    input scales, markers (also those of layers a comfy_quant file kept in high precision)."""
    ignored = FORMAT_KEYS[fmt].ignored
    markers = {key for key in infos if key.rsplit(".", 1)[-1] in ignored}
    scales = {weight.scale_key for weight in layers.values() if weight.scale_key}
    return markers | scales | ({SCALED_FP8_MARKER, *TOKENIZER_TENSORS} & infos.keys())


def per_channel_scale(scale: Tensor, out_features: int, key: str, source: str) -> Tensor:
    """A stored scale as float32 `[out]`: a per-tensor scalar is broadcast, `[out]` and
    `[out, 1]` are taken as they are."""
    flat = scale.float().reshape(-1)
    if flat.numel() == 1:
        return flat.expand(out_features).clone()
    if flat.numel() == out_features:
        return flat.clone()
    raise CheckpointError(f"{source}: scale {key} has shape {tuple(scale.shape)}; expected a scalar or "
                          f"one per output channel ({out_features})")
