"""Loading the tiny preview VAEs (TAEHV: taew2_1 / taew2_2, LightX2V's lighttaew2_x).

Where the file is: `--tiny-vae PATH`, or else the checkpoint folder holds it under its
published name (`taew2_1.pth` for the 16-channel Wan2.1 latents of the A14B models,
`taew2_2.pth` for TI2V-5B's 48 channels; `.safetensors` and the `lighttae` names work too).
The architecture is read from the file (latent channels from `decoder.1.weight`, the pixel
patch from `encoder.0.weight`); whether it decodes raw VAE latents (lighttae) from its name.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import torch
from torch import Tensor

from wanrt.configs import VAEConfig
from wanrt.errors import CheckpointError
from wanrt.loading.files import iter_safetensors, load_pth, require_file
from wanrt.loading.state import assign_tensors, check_state_keys
from wanrt.models.tiny_vae import TGrow, TinyVAE, TinyVAEConfig

class VAEKind(str, Enum):
    """What decodes the video: the model's VAE, or the tiny preview one."""

    FULL = "full"
    TINY = "tiny"


# Published file stems per latent channel count, in the order they are looked for.
TINY_VAE_NAMES = {16: ("taew2_1", "lighttaew2_1"), 48: ("taew2_2", "lighttaew2_2")}
TINY_VAE_SUFFIXES = (".pth", ".safetensors")


def find_tiny_vae(ckpt_dir: Path, vae: VAEConfig) -> Path:
    """The tiny VAE for `vae`'s latents inside the checkpoint folder, or one line saying where
    to put it."""
    names = TINY_VAE_NAMES.get(vae.z_dim, ())
    for name in names:
        for suffix in TINY_VAE_SUFFIXES:
            if (Path(ckpt_dir) / f"{name}{suffix}").is_file():
                return Path(ckpt_dir) / f"{name}{suffix}"
    wanted = f"{names[0]}.pth" if names else "a TAEHV file"
    raise CheckpointError(f"--vae tiny: no {wanted} in {ckpt_dir}; download it from "
                          f"github.com/madebyollin/taehv into that folder, or pass --tiny-vae PATH")


def _read_state(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        return dict(iter_safetensors(require_file(path, "tiny VAE")))
    return load_pth(path)


def load_tiny_vae(path: Path, vae: VAEConfig, dtype: torch.dtype | None = None) -> TinyVAE:
    """The tiny VAE in `path` (published key layout), checked against `vae`'s latent space."""
    path = Path(path)
    state = _read_state(path)
    try:
        latent_channels = state["decoder.1.weight"].shape[1]
        patch_size = round((state["encoder.0.weight"].shape[1] / 3) ** 0.5)
    except KeyError:
        raise CheckpointError(f"{path}: not a TAEHV checkpoint (no decoder.1.weight / encoder.0.weight)") from None
    if latent_channels != vae.z_dim:
        raise CheckpointError(f"{path}: a tiny VAE for {latent_channels}-channel latents, but this task's "
                              f"latents have {vae.z_dim}; use {TINY_VAE_NAMES.get(vae.z_dim, ('?',))[0]}")
    config = TinyVAEConfig(latent_channels, patch_size, vae.latent_mean, vae.latent_std,
                           raw_latents=path.name.startswith("lighttae"))
    with torch.device("meta"):
        model = TinyVAE(config)
    # Files trained with temporal upsampling in the first decoder stage hold a wider 1x1
    # conv there; like the reference loader, keep its last frame's output channels.
    for index, layer in enumerate(model.decoder):
        key = f"decoder.{index}.conv.weight"
        if isinstance(layer, TGrow) and key in state and state[key].shape[0] > layer.conv.weight.shape[0]:
            state[key] = state[key][-layer.conv.weight.shape[0]:]
    check_state_keys(model, state, str(path))
    return assign_tensors(model, [state], dtype)
