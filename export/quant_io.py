"""Quantized DiT checkpoints: saved in the official folder layout plus a manifest.

    config.json                       the official DiT config
    diffusion_pytorch_model[-0000k-of-0000n].safetensors[.index.json]
                                      quantized weights, their scales, the kept layers
    quantization.json                 manifest: format, wanrt and torch versions, scheme,
                                      policy, the QuantReport, sha256 of the source weights

Every file is written atomically; the manifest is removed first and written last, so a
folder without one is an unfinished save. Loading builds the DiT on `meta`, swaps in the
quantized modules the report names, checks keys, shapes and stored dtypes strictly, then
assigns the tensors: the round trip is bit-exact.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import torch

import wanrt
from wanrt.configs import DiTConfig
from wanrt.errors import CheckpointError, ConfigError
from wanrt.export.quantize import (
    QUANT_ATTR,
    QuantReport,
    Scheme,
    parse_scheme,
    quantize_layers,
)
from wanrt.loading.checkpoint import complete_dit_config, shard_headers
from wanrt.loading.files import (
    TensorInfo,
    iter_safetensors,
    require_file,
    safetensors_shards,
)
from wanrt.loading.save import (
    DIT_WEIGHTS_STEM,
    official_dit_config,
    save_safetensors_sharded,
    write_json,
)
from wanrt.loading.state import MAX_LISTED_KEYS, assign_tensors, check_state_keys
from wanrt.models.dit import WanDiT

MANIFEST_NAME = "quantization.json"
FORMAT = "wanrt-quantized-dit"
FORMAT_VERSION = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Stored dtypes that are the quantized format itself: loading refuses any other.
_PAYLOAD_DTYPES = (torch.int8, torch.uint8, torch.float8_e4m3fn)


def source_weights_sha256(folder: Path) -> str:
    """sha256 over the safetensors files of a DiT folder, in shard order (streamed)."""
    digest = hashlib.sha256()
    for shard in safetensors_shards(Path(folder), DIT_WEIGHTS_STEM):
        with open(shard, "rb") as fh:
            while block := fh.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def save_quantized(model: WanDiT, folder: Path, source_hash: str,
                   max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write a model quantized by `quantize`/`calibrate_and_guard` to `folder`; returns the manifest."""
    report: QuantReport | None = getattr(model, QUANT_ATTR, None)
    if report is None:
        raise ConfigError("the model is not quantized: run quantize() or calibrate_and_guard() first")
    if not _SHA256.fullmatch(source_hash):
        raise ConfigError(f"source_hash {source_hash!r} is not a lowercase hex sha256 of the source weights")
    folder = Path(folder)
    manifest_path = folder / MANIFEST_NAME
    manifest_path.unlink(missing_ok=True)
    stale = set(folder.glob(f"{DIT_WEIGHTS_STEM}*.safetensors*"))
    state = {key: tensor.detach().cpu() for key, tensor in model.state_dict().items()}
    written = save_safetensors_sharded(state, folder, DIT_WEIGHTS_STEM, max_shard_bytes)
    if len(written) > 1:
        written.append(folder / f"{DIT_WEIGHTS_STEM}.safetensors.index.json")
    for path in stale - set(written):  # e.g. the shards of an earlier, larger save
        path.unlink()
    write_json(folder / "config.json", official_dit_config(model.config))
    write_json(manifest_path, {
        "format": FORMAT, "format_version": FORMAT_VERSION, "wanrt_version": wanrt.__version__,
        "torch_version": torch.__version__, "source_sha256": source_hash, **report.to_dict()})
    return manifest_path


def _read_json(path: Path, what: str) -> dict[str, Any]:
    require_file(path, what)
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: {what} is not valid JSON") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return raw


def _check_manifest(manifest: Mapping[str, Any], path: Path, scheme: Scheme | None,
                    source_hash: str | None) -> QuantReport:
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} manifest "
                              f"(format {manifest.get('format')!r} v{manifest.get('format_version')!r})")
    if manifest.get("wanrt_version") != wanrt.__version__:
        raise CheckpointError(f"{path}: written by wanrt {manifest.get('wanrt_version')!r}, this is wanrt "
                              f"{wanrt.__version__}; quantize the source weights again")
    try:
        report = QuantReport.from_dict(manifest)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    if report.scheme is Scheme.BF16:
        raise CheckpointError(f"{path}: scheme bf16 is not quantized; load the source weights instead")
    if scheme is not None and report.scheme is not scheme:
        raise CheckpointError(f"{path}: holds {report.scheme.value} weights but {scheme.value} was asked for; "
                              "point at the matching quantized folder or quantize again")
    if source_hash is not None and manifest.get("source_sha256") != source_hash:
        raise CheckpointError(f"{path}: quantized from weights with sha256 {manifest.get('source_sha256')}, "
                              f"not from {source_hash}; quantize these weights again")
    return report


def _check_report_layers(model: WanDiT, report: QuantReport, path: Path) -> None:
    """The report must list exactly the model's Linears (a tampered or foreign report does not)."""
    linears = {name for name, module in model.named_modules() if type(module) is torch.nn.Linear}
    listed = Counter(layer.name for layer in report.layers)
    problems = sorted(listed.keys() ^ linears) + sorted(name for name, count in listed.items() if count > 1)
    if problems:
        raise CheckpointError(f"{path}: the report does not list the model's Linear layers "
                              f"(mismatched: {', '.join(problems[:MAX_LISTED_KEYS])})")


def _check_stored_dtypes(model: WanDiT, infos: Mapping[str, TensorInfo], source: str) -> None:
    """Quantized values and their float32 scales must be stored in exactly their format."""
    wrong = [f"{key} {infos[key].dtype} != {tensor.dtype}" for key, tensor in model.state_dict().items()
             if (tensor.dtype in _PAYLOAD_DTYPES or key.endswith(".weight_scale"))
             and infos[key].dtype != tensor.dtype]
    if wrong:
        raise CheckpointError(f"{source}: quantized tensors stored with the wrong dtype: "
                              f"{', '.join(wrong[:MAX_LISTED_KEYS])}")


def quantized_scheme(folder: Path) -> str:
    """The scheme a quantized folder holds, read from its manifest before any loading."""
    manifest_path = Path(folder) / MANIFEST_NAME
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST_NAME}; not a quantized wanrt checkpoint, "
                              "or its save did not finish")
    return parse_scheme(_read_json(manifest_path, "quantization manifest").get("scheme", "")).value


def load_quantized(folder: Path, expect_config: DiTConfig | None = None,
                   device: torch.device | str = "cpu", scheme: Scheme | str | None = None,
                   source_hash: str | None = None) -> WanDiT:
    """Load a folder written by `save_quantized`; `scheme`/`source_hash` are checked if given."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST_NAME}; not a quantized wanrt checkpoint, "
                              "or its save did not finish")
    try:
        expected_scheme = parse_scheme(scheme) if scheme is not None else None
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    report = _check_manifest(_read_json(manifest_path, "quantization manifest"), manifest_path,
                             expected_scheme, source_hash)
    config_path = folder / "config.json"
    try:
        config = DiTConfig.from_official_json(_read_json(config_path, "DiT config.json"), str(config_path))
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    shards = safetensors_shards(folder, DIT_WEIGHTS_STEM)
    infos = shard_headers(shards)
    config = complete_dit_config(config, infos, expect_config, str(folder))
    with torch.device("meta"):
        model = WanDiT(config)
    _check_report_layers(model, report, manifest_path)
    quantize_layers(model, report.scheme, report.quantized_names)
    check_state_keys(model, infos, str(folder))
    _check_stored_dtypes(model, infos, str(folder))
    # One chunk: a quanto layer's tensors must arrive together, and a shard boundary may
    # split them. The tensors are read once either way.
    state = {key: tensor for shard in shards for key, tensor in iter_safetensors(shard)}
    assign_tensors(model, [state])
    setattr(model, QUANT_ATTR, report)
    return model.to(device)
