"""Writing checkpoints in the official on-disk layout (tiny demo models, converted weights).

Files are written to a temporary name and moved into place with `os.replace`, so a crash
never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors.torch import save_file
from torch import Tensor

from wanrt.configs import DiTConfig
from wanrt.models.dit import WanDiT

DIT_WEIGHTS_STEM = "diffusion_pytorch_model"
# What the released config.json files hold: text_dim, patch_size, qk_norm and
# cross_attn_norm are never stored (the official WanModel ignores them).
OFFICIAL_CONFIG_FIELDS = ("dim", "eps", "ffn_dim", "freq_dim", "in_dim", "model_type", "num_heads",
                          "num_layers", "out_dim", "text_len")


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp_path)` then move the result to `path` in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp creates 0600, and some writers (safetensors) create the file anew with
        # 0600 too: give the result the permissions a plain open() would, whoever wrote it.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Mapping) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n"))


def official_dit_config(config: DiTConfig) -> dict:
    raw = {name: getattr(config, name) for name in OFFICIAL_CONFIG_FIELDS}
    raw["model_type"] = config.model_type.value
    return {"_class_name": "WanModel", **raw}


def _split_into_shards(state: Mapping[str, Tensor], max_shard_bytes: int) -> list[dict[str, Tensor]]:
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.contiguous()
        size += nbytes
    return shards


def save_safetensors_sharded(state: Mapping[str, Tensor], folder: Path, stem: str,
                             max_shard_bytes: int) -> list[Path]:
    """`<stem>.safetensors`, or `<stem>-0000k-of-0000n.safetensors` plus the index json."""
    shards = _split_into_shards(state, max_shard_bytes)
    if len(shards) == 1:
        names = [f"{stem}.safetensors"]
    else:
        names = [f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for name, shard in zip(names, shards):
        write_atomic(folder / name, lambda tmp, shard=shard: save_file(shard, str(tmp)))
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
        write_json(folder / f"{stem}.safetensors.index.json",
                   {"metadata": {"total_size": total}, "weight_map": weight_map})
    return [folder / name for name in names]


def save_dit_official(model: WanDiT, folder: Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """One DiT (expert) folder exactly as released: config.json + (sharded) safetensors."""
    folder = Path(folder)
    save_safetensors_sharded(model.state_dict(), folder, DIT_WEIGHTS_STEM, max_shard_bytes)
    write_json(folder / "config.json", official_dit_config(model.config))


def save_pth(state: Mapping[str, Tensor], path: Path) -> None:
    """A plain state dict as `.pth` (the official VAE and T5 format)."""
    write_atomic(Path(path), lambda tmp: torch.save(dict(state), tmp))
