"""Loading the S2V-14B DiT from the official layout (`WanModel_S2V` config.json + shards).

The official parameter names are the model's own (`wanrt.models.s2v_dit` keeps them, the
`casual_audio_encoder` spelling included), so the key map is the identity; loading is as
strict as for the other DiTs: every parameter present with its shape, nothing left over.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from wanrt.configs import DiTConfig, S2VConfig
from wanrt.errors import CheckpointError, ConfigError
from wanrt.loading.checkpoint import _read_json, _renamed_chunks, _renamed_headers, complete_dit_config
from wanrt.loading.files import safetensors_shards
from wanrt.loading.save import DIT_WEIGHTS_STEM, official_dit_config, save_safetensors_sharded, write_json
from wanrt.loading.state import assign_tensors, check_state_keys
from wanrt.models.s2v_dit import WanS2VDiT

OFFICIAL_CLASS_NAME = "WanModel_S2V"


def official_key(key: str) -> str:
    """Official checkpoint key -> wanrt parameter name (the same names)."""
    return key


def read_s2v_config(folder: Path) -> tuple[DiTConfig, S2VConfig]:
    path = Path(folder) / "config.json"
    raw = _read_json(path, "DiT config.json")
    if raw.get("_class_name") != OFFICIAL_CLASS_NAME:
        raise CheckpointError(f"{path}: not an S2V DiT ({raw.get('_class_name')!r}, needs "
                              f"{OFFICIAL_CLASS_NAME!r}); point --ckpt-dir at Wan2.2-S2V-14B")
    try:
        s2v, rest = S2VConfig.split_official_json(raw, str(path))
        return DiTConfig.from_official_json(rest, str(path)), s2v
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def load_s2v_dit(folder: Path, expect: DiTConfig | None = None, dtype: torch.dtype | None = None) -> WanS2VDiT:
    """The S2V DiT of an official folder, built on `meta` and assigned shard by shard."""
    folder = Path(folder)
    config, s2v = read_s2v_config(folder)
    shards = safetensors_shards(folder, "diffusion_pytorch_model")
    infos = _renamed_headers(shards, official_key)
    config = complete_dit_config(config, infos, expect, str(folder))
    with torch.device("meta"):
        model = WanS2VDiT(config, s2v)
    check_state_keys(model, infos, str(folder))
    return assign_tensors(model, _renamed_chunks(shards, official_key), dtype)


def official_s2v_config(model: WanS2VDiT) -> dict:
    """The released config.json of an S2V DiT (`WanModel_S2V`)."""
    return {**official_dit_config(model.config), "_class_name": OFFICIAL_CLASS_NAME,
            **dataclasses.asdict(model.s2v)}


def save_s2v_dit_official(model: WanS2VDiT, folder: Path, max_shard_bytes: int) -> None:
    """An S2V DiT folder as released: config.json + (sharded) safetensors."""
    save_safetensors_sharded(model.state_dict(), Path(folder), DIT_WEIGHTS_STEM, max_shard_bytes)
    write_json(Path(folder) / "config.json", official_s2v_config(model))
