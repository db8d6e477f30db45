"""Key maps of the LoRA files people download for Wan2.2, one per format.

A LoRA key names a module of the DiT and a part of its patch. The formats differ in how
they name the module; the parts are shared:

- `<module>.lora_down.weight` / `.lora_A.weight` (down, [rank, in]) and
  `<module>.lora_up.weight` / `.lora_B.weight` (up, [out, rank]), optional `<module>.alpha`;
- full deltas: `<module>.diff` (weight), `<module>.diff_b` (bias), and `<block>.diff_m`
  (the `modulation` table of `blocks.N` or `head`), as LightX2V and ComfyUI write them.

Formats (after one prefix `diffusion_model.`, `model.diffusion_model.`, `transformer.` or
PEFT's `base_model.model.` is stripped):
- WAN: the official module names (`blocks.0.self_attn.q`, `head.head`): ComfyUI, LightX2V,
  kijai's WanVideoWrapper, the Wan2.2-Lightning release, the official Animate relighting LoRA;
- MUSUBI: kohya-style flattened names, `lora_unet_blocks_0_self_attn_q` (musubi-tuner);
- DIFFUSERS: diffusers module names (`blocks.0.attn1.to_q`, `proj_out`,
  `condition_embedder.time_proj`), mapped through the diffusers checkpoint key map.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Iterable

from wanrt.errors import CheckpointError
from wanrt.loading import diffusers_dit


class LoraFormat(str, Enum):
    WAN = "wan"
    MUSUBI = "musubi"
    DIFFUSERS = "diffusers"


class Part(str, Enum):
    DOWN = "down"
    UP = "up"
    ALPHA = "alpha"
    WEIGHT_DIFF = "weight_diff"
    BIAS_DIFF = "bias_diff"
    MODULATION_DIFF = "modulation_diff"


# Key suffix -> part; `.diff` is tried after `.diff_b`/`.diff_m` (dict order).
PART_SUFFIXES = {
    ".lora_down.weight": Part.DOWN, ".lora_A.weight": Part.DOWN,
    ".lora_up.weight": Part.UP, ".lora_B.weight": Part.UP,
    ".alpha": Part.ALPHA,
    ".diff_b": Part.BIAS_DIFF, ".diff_m": Part.MODULATION_DIFF, ".diff": Part.WEIGHT_DIFF,
}
# The official parameter (leaf name) each part changes.
PART_PARAMETER = {Part.DOWN: "weight", Part.UP: "weight", Part.ALPHA: "weight", Part.WEIGHT_DIFF: "weight",
                  Part.BIAS_DIFF: "bias", Part.MODULATION_DIFF: "modulation"}
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.")
MUSUBI_PREFIX = "lora_unet_"
# Module names that only diffusers uses: their presence decides the format of a file.
_DIFFUSERS_MODULE = re.compile(r"(^|\.)(attn1|attn2|condition_embedder|proj_out|ffn\.net)(\.|$)")
# Wan2.1-I2V LoRAs also train the CLIP image branch, which Wan2.2 has not: loading them
# on Wan2.2 drops those keys (reported once), as every peer does.
_HARMLESS = {
    LoraFormat.WAN: re.compile(r"blocks\.\d+\.cross_attn\.(k_img|v_img|norm_k_img)|img_emb\..+"),
    LoraFormat.MUSUBI: re.compile(r"lora_unet_(blocks_\d+_cross_attn_(k_img|v_img|norm_k_img)|img_emb_.+)"),
    LoraFormat.DIFFUSERS: re.compile(r"blocks\.\d+\.attn2\.(add_k_proj|add_v_proj|norm_added_k)"
                                     r"|condition_embedder\.image_embedder\..+"),
}
# A module path: dotted names, no empty segment, nothing that could read as a file path.
_MODULE_PATH = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def split_key(key: str) -> tuple[str, Part] | None:
    """(module path without prefix, part) of a LoRA key, or None if it is no LoRA key."""
    for suffix, part in PART_SUFFIXES.items():
        if key.endswith(suffix):
            path = key[:-len(suffix)]
            for prefix in PREFIXES:
                if path.startswith(prefix):
                    path = path[len(prefix):]
                    break
            return (path, part) if _MODULE_PATH.fullmatch(path) else None
    return None


def detect_format(keys: Iterable[str]) -> LoraFormat:
    paths = [split for split in map(split_key, keys) if split is not None]
    if any(path.startswith(MUSUBI_PREFIX) for path, _ in paths):
        return LoraFormat.MUSUBI
    if any(_DIFFUSERS_MODULE.search(path) for path, _ in paths):
        return LoraFormat.DIFFUSERS
    return LoraFormat.WAN


class KeyMap:
    """Official parameter name of `(module path, part)` in one format, for one model."""

    def __init__(self, lora_format: LoraFormat, parameters: Iterable[str]) -> None:
        self.format = lora_format
        self.parameters = set(parameters)
        # musubi flattens the official module path: `blocks.0.self_attn.q` -> `blocks_0_self_attn_q`.
        self._musubi = {MUSUBI_PREFIX + name.rsplit(".", 1)[0].replace(".", "_"): name.rsplit(".", 1)[0]
                        for name in self.parameters}

    def official_module(self, path: str) -> str | None:
        if self.format is LoraFormat.MUSUBI:
            return self._musubi.get(path)
        if self.format is LoraFormat.DIFFUSERS:
            try:
                return diffusers_dit.official_key(f"{path}.weight").removesuffix(".weight")
            except CheckpointError:
                return None
        return path

    def parameter(self, path: str, part: Part) -> str | None:
        """The model parameter this key changes, None when the model has no such parameter."""
        module = self.official_module(path)
        name = None if module is None else f"{module}.{PART_PARAMETER[part]}"
        return name if name in self.parameters else None

    def is_harmless(self, path: str) -> bool:
        """A module of the Wan2.1 image branch, which a Wan2.2 model lacks."""
        return bool(_HARMLESS[self.format].fullmatch(path))
