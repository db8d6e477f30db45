"""Loading the single checkpoint files users download: ComfyUI repackaged files (fp16, bf16,
fp8_scaled, comfy_quant), Kijai's fp8 casts, LightX2V distilled files, GGUF quants.

Every format is decoded by a `WeightFile` into official Wan key names with, for each Linear
stored in 8 bits, its values and its own scale. The DiT's architecture is read from the
tensor shapes and checked against the task before any tensor data is read; 8-bit Linears
stay 8-bit (`stored_linears`), everything else is cast to the run's dtype. Tensors are read
one at a time straight into their final buffers (`files.read_into`).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from pathlib import Path
from typing import BinaryIO, Iterator, Mapping

import torch
from torch import Tensor, nn

from wanrt.configs import DiTConfig
from wanrt.errors import CheckpointError
from wanrt.loading import safetensors_formats as formats
from wanrt.loading.diffusers_dit import MODEL_TYPE_BY_CHANNELS
from wanrt.loading.files import TensorInfo, read_safetensors_layout, read_stored, require_file
from wanrt.loading.safetensors_formats import FileFormat
from wanrt.loading.state import assign_tensors, cast_for_model, check_state_keys
from wanrt.loading.stored_linears import StoredKind, scale_dtype, scale_shape, swap_in_stored_linears
from wanrt.models.dit import WanDiT

# Prefixes single files put before the official key names: ComfyUI full checkpoints and
# some repackaged files (`model.diffusion_model.`), ComfyUI diffusion-model saves
# (`diffusion_model.`), Kijai's loader also strips a bare `model.`.
DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
# ComfyUI full checkpoints keep the VAE under `first_stage_model.`.
VAE_PREFIXES = ("first_stage_model.",)
SINGLE_FILE_SUFFIXES = (".safetensors", ".sft", ".gguf")
# Tensors per `load_state_dict` call: one call per tensor would walk the model each time.
_ASSIGN_BATCH = 64


def is_single_file(path: Path) -> bool:
    return Path(path).suffix.lower() in SINGLE_FILE_SUFFIXES


def strip_prefix(key: str, prefixes: tuple[str, ...]) -> str:
    for prefix in prefixes:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


class WeightFile(abc.ABC):
    """One checkpoint file decoded into official key names.

    `infos`: the logical shape of every model tensor the file holds (companion keys such as
    scales and markers excluded); `quantized`: layer -> storage kind of each Linear weight
    stored in 8 bits. `read(key)` gives a float tensor (8-bit weights dequantized);
    `read_stored(layer)` the 8-bit values and their scale in the `stored_linears` layout.
    """

    format: FileFormat
    infos: dict[str, TensorInfo]
    quantized: dict[str, StoredKind]

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fh: BinaryIO | None = None

    @contextlib.contextmanager
    def opened(self) -> Iterator["WeightFile"]:
        with open(self.path, "rb", buffering=0) as fh:
            self._fh = fh
            try:
                yield self
            finally:
                self._fh = None

    @property
    def fh(self) -> BinaryIO:
        if self._fh is None:
            raise RuntimeError("read tensors inside `with weight_file.opened():`")
        return self._fh

    @abc.abstractmethod
    def read(self, key: str) -> Tensor: ...

    @abc.abstractmethod
    def read_stored(self, layer: str) -> tuple[Tensor, Tensor]: ...


class SafetensorsFile(WeightFile):
    """A safetensors single file in any of `safetensors_formats.FileFormat`'s layouts."""

    def __init__(self, path: Path, prefixes: tuple[str, ...] = ()) -> None:
        super().__init__(path)
        layout = read_safetensors_layout(self.path)
        self._stored = {}
        for key, stored in layout.tensors.items():
            official = strip_prefix(key, prefixes)
            if official in self._stored:
                raise CheckpointError(f"{self.path}: key {official!r} appears twice (with and without a prefix)")
            self._stored[official] = stored
        raw_infos = {key: stored.info for key, stored in self._stored.items()}
        self.format = formats.detect_safetensors_format(raw_infos, layout.metadata)
        with self.opened():
            self._weights = formats.quantized_weights(self.format, raw_infos, layout.metadata,
                                                      self._read_raw, str(self.path))
        companions = formats.companion_keys(self.format, raw_infos, self._weights)
        self.infos = {key: info for key, info in raw_infos.items() if key not in companions}
        self.quantized = {layer: weight.kind for layer, weight in self._weights.items()}

    def _read_raw(self, key: str) -> Tensor:
        return read_stored(self.fh, self._stored[key], self.path)

    def read_stored(self, layer: str) -> tuple[Tensor, Tensor]:
        weight = self._weights[layer]
        values = self._read_raw(weight.weight_key)
        if weight.scale_key is None:
            return values, torch.ones(values.shape[0])
        scale = formats.per_channel_scale(self._read_raw(weight.scale_key), values.shape[0],
                                          weight.scale_key, str(self.path))
        return values, scale

    def read(self, key: str) -> Tensor:
        layer = key.removesuffix(".weight")
        if key.endswith(".weight") and layer in self._weights:
            return dequantize(*self.read_stored(layer))
        return self._read_raw(key)


def dequantize(values: Tensor, scale: Tensor) -> Tensor:
    """float32 weights from 8-bit values and their per-output-channel scale; a weight of any
    rank (a conv kernel) scales along its first axis."""
    return values.float() * scale.float().reshape(-1, *([1] * (values.dim() - 1)))


def open_weight_file(path: Path, prefixes: tuple[str, ...] = ()) -> WeightFile:
    """The decoder for `path`, chosen from its first bytes (GGUF magic) or its header."""
    path = Path(path)
    require_file(path, "checkpoint file")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    from wanrt.loading import gguf_file

    if magic == gguf_file.GGUF_MAGIC:
        return gguf_file.GGUFFile(path, prefixes)
    if path.suffix.lower() == ".gguf":
        raise CheckpointError(f"{path}: not a GGUF file (no GGUF magic); download it again")
    return SafetensorsFile(path, prefixes)


def file_format(path: Path) -> FileFormat:
    """The format of a component path: a single file's decoded format, `pth` for a .pth."""
    path = Path(path)
    if is_single_file(path):
        return open_weight_file(path).format
    return FileFormat.PTH


# ---------------------------------------------------------------------- the DiT


# The tensors whose shapes give the architecture.
ARCHITECTURE_KEYS = ("patch_embedding.weight", "head.head.weight", "blocks.0.ffn.0.weight",
                     "time_embedding.0.weight", "text_embedding.0.weight")


def dit_config_from_shapes(infos: Mapping[str, TensorInfo], expect: DiTConfig, source: str) -> DiTConfig:
    """The architecture the weights have: widths, channels, depth and patch from the shapes;
    what shapes cannot tell (heads, text length, eps) from the task. Refuses a DiT of
    another variant than `expect` before anything is read."""
    from wanrt.loading.checkpoint import check_dit_variant  # checkpoint imports this module

    missing = [key for key in ARCHITECTURE_KEYS if key not in infos]
    if missing:
        raise CheckpointError(f"{source}: missing keys: {', '.join(missing)}; this file does not hold a whole "
                              "Wan2.2 DiT (is it a VAE or text encoder file?)")
    dim, in_dim, *patch = infos["patch_embedding.weight"].shape
    head_rows = infos["head.head.weight"].shape[0]
    patch_volume = patch[0] * patch[1] * patch[2] if len(patch) == 3 else 0
    if not patch_volume or head_rows % patch_volume:
        raise CheckpointError(f"{source}: patch_embedding/head shapes match no Wan2.2 DiT")
    out_dim = head_rows // patch_volume
    num_layers = len({key.split(".")[1] for key in infos if key.startswith("blocks.")})
    found = dataclasses.replace(
        expect, in_dim=in_dim, out_dim=out_dim, dim=dim,
        ffn_dim=infos["blocks.0.ffn.0.weight"].shape[0], num_layers=num_layers,
        freq_dim=infos["time_embedding.0.weight"].shape[1],
        text_dim=infos["text_embedding.0.weight"].shape[1], patch_size=tuple(patch),
        model_type=MODEL_TYPE_BY_CHANNELS.get((in_dim, out_dim), expect.model_type))
    check_dit_variant(found, expect, source)
    return found


def _missing_hint(error: CheckpointError, weights: WeightFile) -> CheckpointError:
    """LightX2V's quantized files are the ones known to leave tensors out: say where they are."""
    if weights.format is FileFormat.LIGHTX2V and "missing keys" in str(error):
        return CheckpointError(
            f"{error}; LightX2V's quantized files may leave out the high-precision tensors (norms, "
            "embeddings, head): use the bf16 file of the same model (`*_lightx2v_4step.safetensors` "
            "from lightx2v/Wan2.2-Distill-Models) or its `_comfyui` variant")
    return error


def load_into(model: nn.Module, weights: WeightFile, dtype: torch.dtype | None,
              keep_quantized: Mapping[str, StoredKind]) -> nn.Module:
    """Check `weights` against `model` (built on meta) strictly, then assign every tensor:
    the `keep_quantized` Linears as stored, the rest cast to `dtype`."""
    swap_in_stored_linears(model, dict(keep_quantized), f"a {weights.format.value} file")
    expected = dict(weights.infos)
    for layer, kind in keep_quantized.items():
        out_features, in_features = weights.infos[f"{layer}.weight"].shape
        expected[f"{layer}.weight_scale"] = TensorInfo(scale_shape(kind, out_features, in_features), scale_dtype(kind))
    try:
        check_state_keys(model, expected, str(weights.path))
    except CheckpointError as exc:
        raise _missing_hint(exc, weights) from None
    keep_fp32 = tuple(getattr(model, "keep_in_fp32", ()))
    batch: dict[str, Tensor] = {}
    with weights.opened():
        for key in weights.infos:
            layer = key.removesuffix(".weight")
            if key.endswith(".weight") and layer in keep_quantized:
                batch[key], batch[f"{layer}.weight_scale"] = weights.read_stored(layer)
            else:
                batch[key] = cast_for_model(key, weights.read(key), dtype, keep_fp32, owned=True)
            if len(batch) >= _ASSIGN_BATCH:
                model.load_state_dict(batch, strict=False, assign=True)
                batch = {}
    model.load_state_dict(batch, strict=False, assign=True)
    return assign_tensors(model, [])  # nothing left to assign: checks that nothing stayed on meta


def open_dit_file(path: Path) -> WeightFile:
    """A DiT single file, its official key names restored (a GGUF must be of arch `wan`)."""
    weights = open_weight_file(path, DIT_PREFIXES)
    architecture = getattr(weights, "architecture", None)
    if architecture not in (None, "wan"):
        raise CheckpointError(f"{path}: a GGUF of architecture {architecture!r}, not a Wan DiT")
    return weights


def dit_file_config(weights: WeightFile, expect: DiTConfig) -> DiTConfig:
    """`dit_config_from_shapes` of an opened DiT file; an incomplete LightX2V file is told
    where the tensors it lacks are."""
    try:
        return dit_config_from_shapes(weights.infos, expect, str(weights.path))
    except CheckpointError as exc:
        raise _missing_hint(exc, weights) from None


def load_dit_file(path: Path, expect: DiTConfig, dtype: torch.dtype | None = None) -> WanDiT:
    """One DiT (expert) from a single file; 8-bit Linears of the file run as 8-bit."""
    weights = open_dit_file(path)
    config = dit_file_config(weights, expect)
    with torch.device("meta"):
        model = WanDiT(config)
    linears = {name for name, module in model.named_modules() if type(module) is nn.Linear}
    return load_into(model, weights, dtype,
                     {layer: kind for layer, kind in weights.quantized.items() if layer in linears})


def read_state(path: Path, prefixes: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """Every tensor of a single file as float (8-bit weights dequantized): the VAE and T5,
    which run in their own dtype whatever the file stores."""
    weights = open_weight_file(path, prefixes)
    with weights.opened():
        return {key: weights.read(key) for key in weights.infos}
