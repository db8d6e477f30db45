"""Key map and config reader for the diffusers layout of the Wan VAEs (`AutoencoderKLWan`).

Both layouts hold the same tensors with the same shapes; only the names differ. Outside the
resolution stages the names map one to one (`FIXED_UNITS`). The stages are grouped
differently, so the map is generated from the stage structure (residual blocks per stage,
and whether the stage ends in a resampler), which is read from the keys themselves:

    official 2.1   encoder.downsamples.N                decoder.upsamples.N  (flat)
    diffusers 2.1  encoder.down_blocks.N                decoder.up_blocks.I.{resnets.J, upsamplers.0}
    official 2.2   encoder.downsamples.I.downsamples.P  decoder.upsamples.I.upsamples.P
    diffusers 2.2  encoder.down_blocks.I.{resnets.J, downsampler}
                   decoder.up_blocks.I.{resnets.J, upsampler}

Modules are paired by name and position, never by parameter order: diffusers' mid-block
registers its attention before its second residual block.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

from torch import Tensor

from wanrt.configs import WAN21_LATENT_MEAN, WAN21_LATENT_STD, VAEConfig, VAEVersion
from wanrt.errors import CheckpointError, ConfigError

# Parameter names inside one residual block: diffusers -> official.
RESIDUAL_LEAVES = {
    "norm1.gamma": "residual.0.gamma",
    "conv1.weight": "residual.2.weight",
    "conv1.bias": "residual.2.bias",
    "norm2.gamma": "residual.3.gamma",
    "conv2.weight": "residual.6.weight",
    "conv2.bias": "residual.6.bias",
    "conv_shortcut.weight": "shortcut.weight",
    "conv_shortcut.bias": "shortcut.bias",
}
RESAMPLE_LEAVES = {name: name for name in
                   ("resample.1.weight", "resample.1.bias", "time_conv.weight", "time_conv.bias")}
ATTENTION_LEAVES = {name: name for name in
                    ("norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias")}
CONV_LEAVES = {"weight": "weight", "bias": "bias"}
NORM_LEAVES = {"gamma": "gamma"}

# Modules outside the resolution stages: diffusers path -> (official path, parameter names).
FIXED_UNITS: dict[str, tuple[str, dict[str, str]]] = {
    "quant_conv": ("conv1", CONV_LEAVES),
    "post_quant_conv": ("conv2", CONV_LEAVES),
    **{f"{part}.{diffusers}": (f"{part}.{official}", leaves)
       for part in ("encoder", "decoder")
       for diffusers, official, leaves in (
           ("conv_in", "conv1", CONV_LEAVES),
           ("mid_block.resnets.0", "middle.0", RESIDUAL_LEAVES),
           ("mid_block.attentions.0", "middle.1", ATTENTION_LEAVES),
           ("mid_block.resnets.1", "middle.2", RESIDUAL_LEAVES),
           ("norm_out", "head.0", NORM_LEAVES),
           ("conv_out", "head.2", CONV_LEAVES))},
}

# One (residual blocks, ends in a resampler) pair per resolution stage.
Stages = list[tuple[int, bool]]

# Stage-module patterns, (index groups..., parameter name); "nested" groups a stage's
# modules under one index, "flat" numbers all modules of encoder or decoder in sequence.
_DIFFUSERS_STAGES = {
    (VAEVersion.WAN2_1, "encoder"): (r"encoder\.down_blocks\.(\d+)\.(.+)", False),
    (VAEVersion.WAN2_1, "decoder"): (r"decoder\.up_blocks\.(\d+)\.(?:resnets\.(\d+)|upsamplers\.0)\.(.+)", True),
    (VAEVersion.WAN2_2, "encoder"): (r"encoder\.down_blocks\.(\d+)\.(?:resnets\.(\d+)|downsampler)\.(.+)", True),
    (VAEVersion.WAN2_2, "decoder"): (r"decoder\.up_blocks\.(\d+)\.(?:resnets\.(\d+)|upsampler)\.(.+)", True),
}
_OFFICIAL_STAGES = {
    (VAEVersion.WAN2_1, "encoder"): (r"encoder\.downsamples\.(\d+)\.(.+)", False),
    (VAEVersion.WAN2_1, "decoder"): (r"decoder\.upsamples\.(\d+)\.(.+)", False),
    (VAEVersion.WAN2_2, "encoder"): (r"encoder\.downsamples\.(\d+)\.downsamples\.(\d+)\.(.+)", True),
    (VAEVersion.WAN2_2, "decoder"): (r"decoder\.upsamples\.(\d+)\.upsamples\.(\d+)\.(.+)", True),
}
# A key of a Wan2.2 stage in each layout (Wan2.1's encoder stages are not nested).
_DIFFUSERS_WAN22 = re.compile(r"encoder\.down_blocks\.\d+\.resnets\.")
_OFFICIAL_WAN22 = re.compile(r"encoder\.downsamples\.\d+\.downsamples\.")


def _read_stages(keys: Iterable[str], pattern: str, nested: bool) -> Stages:
    is_resampler: dict[tuple[int, ...], bool] = {}
    for key in keys:
        match = re.fullmatch(pattern, key)
        if match:
            *indices, leaf = match.groups()
            module = tuple(int(i) for i in indices if i is not None)
            is_resampler[module] = is_resampler.get(module, False) or leaf in RESAMPLE_LEAVES
    stages: Stages = []
    if nested:
        for stage in sorted({module[0] for module in is_resampler}):
            kinds = [kind for module, kind in is_resampler.items() if module[0] == stage]
            stages.append((kinds.count(False), any(kinds)))
        return stages
    residual_blocks = 0
    for module in sorted(is_resampler):
        if is_resampler[module]:
            stages.append((residual_blocks, True))
            residual_blocks = 0
        else:
            residual_blocks += 1
    if residual_blocks:
        stages.append((residual_blocks, False))
    return stages


def _key_table(version: VAEVersion, encoder: Stages, decoder: Stages) -> dict[str, str]:
    """diffusers key -> official key for a VAE with these resolution stages."""
    table = {f"{unit}.{leaf}": f"{official}.{official_leaf}"
             for unit, (official, leaves) in FIXED_UNITS.items()
             for leaf, official_leaf in leaves.items()}
    wan22 = version is VAEVersion.WAN2_2
    for part, stages, diffusers_list, official_list, resampler in (
            ("encoder", encoder, "down_blocks", "downsamples", "downsampler"),
            ("decoder", decoder, "up_blocks", "upsamples", "upsampler" if wan22 else "upsamplers.0")):
        position = 0  # in the flat numbering
        for stage, (residual_blocks, has_resampler) in enumerate(stages):
            modules = [(f"resnets.{j}", RESIDUAL_LEAVES) for j in range(residual_blocks)]
            modules += [(resampler, RESAMPLE_LEAVES)] if has_resampler else []
            for index, (module, leaves) in enumerate(modules):
                if wan22:
                    official = f"{part}.{official_list}.{stage}.{official_list}.{index}"
                else:
                    official = f"{part}.{official_list}.{position}"
                if part == "encoder" and not wan22:
                    diffusers = f"{part}.{diffusers_list}.{position}"
                else:
                    diffusers = f"{part}.{diffusers_list}.{stage}.{module}"
                table.update({f"{diffusers}.{leaf}": f"{official}.{official_leaf}"
                              for leaf, official_leaf in leaves.items()})
                position += 1
    return table


def _rename(state_dict: Mapping[str, Tensor], table: Mapping[str, str], target: str) -> dict[str, Tensor]:
    unknown = sorted(key for key in state_dict if key not in table)
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
        raise CheckpointError(f"VAE keys with no {target} equivalent: {shown}")
    return {table[key]: tensor for key, tensor in state_dict.items()}


def _table_for(keys: list[str], wan22_marker: re.Pattern[str],
               patterns: Mapping[tuple[VAEVersion, str], tuple[str, bool]]) -> dict[str, str]:
    version = VAEVersion.WAN2_2 if any(wan22_marker.match(k) for k in keys) else VAEVersion.WAN2_1
    encoder, decoder = (_read_stages(keys, *patterns[version, part]) for part in ("encoder", "decoder"))
    return _key_table(version, encoder, decoder)


def to_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename an `AutoencoderKLWan` state dict (Wan2.1 or Wan2.2) to the official names."""
    table = _table_for(list(state_dict), _DIFFUSERS_WAN22, _DIFFUSERS_STAGES)
    return _rename(state_dict, table, "official")


def to_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename an official `WanVAE_` state dict (Wan2.1 or Wan2.2) to diffusers' names."""
    table = _table_for(list(state_dict), _OFFICIAL_WAN22, _OFFICIAL_STAGES)
    return _rename(state_dict, {official: diffusers for diffusers, official in table.items()}, "diffusers")


# `AutoencoderKLWan.__init__` defaults, which apply to keys an older config.json lacks.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "base_dim": 96, "decoder_base_dim": None, "z_dim": 16, "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2, "attn_scales": [], "temperal_downsample": [False, True, True],
    "dropout": 0.0, "latents_mean": list(WAN21_LATENT_MEAN), "latents_std": list(WAN21_LATENT_STD),
    "is_residual": False, "in_channels": 3, "out_channels": 3, "patch_size": None,
    "scale_factor_temporal": 4, "scale_factor_spatial": 8,
}
# Keys that do not change the network: bookkeeping, training-only dropout, and the old
# decode-time `clip_output` switch (wanrt's `decode(clamp=...)` decides that).
_IGNORED_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values",
                 "dropout", "clip_output"}
# Pixel channels and patch size of each version: (in_channels, out_channels, patch_size).
_PIXEL_LAYOUT = {VAEVersion.WAN2_1: (3, 3, None), VAEVersion.WAN2_2: (12, 12, 2)}


def config_from_diffusers(raw_config: Mapping[str, Any], source: str = "vae/config.json") -> VAEConfig:
    """VAEConfig of an `AutoencoderKLWan` config.json; anything wanrt cannot run is refused."""
    unknown = sorted(set(raw_config) - set(_DIFFUSERS_DEFAULTS) - _IGNORED_KEYS)
    if unknown:
        raise CheckpointError(f"{source}: unknown AutoencoderKLWan config keys {unknown}")
    class_name = raw_config.get("_class_name", "AutoencoderKLWan")
    if class_name != "AutoencoderKLWan":
        raise CheckpointError(f"{source}: a {class_name}, not a Wan VAE (AutoencoderKLWan)")
    raw = {**_DIFFUSERS_DEFAULTS, **raw_config}
    version = VAEVersion.WAN2_2 if raw["is_residual"] else VAEVersion.WAN2_1
    unsupported = []
    if raw["attn_scales"]:
        unsupported.append(f"attn_scales {raw['attn_scales']} (Wan VAEs have none)")
    layout = (raw["in_channels"], raw["out_channels"], raw["patch_size"])
    if layout != _PIXEL_LAYOUT[version]:
        unsupported.append(f"(in_channels, out_channels, patch_size) {layout} for a Wan{version.value} "
                           f"VAE (needs {_PIXEL_LAYOUT[version]})")
    if version is VAEVersion.WAN2_1 and raw["decoder_base_dim"] not in (None, raw["base_dim"]):
        unsupported.append(f"decoder_base_dim {raw['decoder_base_dim']} != base_dim in a Wan2.1 VAE")
    if len(raw["temperal_downsample"]) != len(raw["dim_mult"]) - 1:
        unsupported.append(f"temperal_downsample {raw['temperal_downsample']} for "
                           f"{len(raw['dim_mult'])} stages")
    if unsupported:
        raise CheckpointError(f"{source}: unsupported AutoencoderKLWan settings: {'; '.join(unsupported)}")
    try:
        config = VAEConfig(
            version=version, dim=raw["base_dim"], z_dim=raw["z_dim"],
            latent_mean=tuple(float(v) for v in raw["latents_mean"]),
            latent_std=tuple(float(v) for v in raw["latents_std"]),
            dec_dim=raw["decoder_base_dim"] if version is VAEVersion.WAN2_2 else None,
            dim_mult=tuple(raw["dim_mult"]), num_res_blocks=raw["num_res_blocks"],
            temporal_downsample=tuple(bool(v) for v in raw["temperal_downsample"]))
    except ConfigError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    # diffusers stores the compression factors separately; they must agree with the network.
    factors = (raw["scale_factor_temporal"], raw["scale_factor_spatial"])
    if factors != config.stride[:2]:
        raise CheckpointError(f"{source}: scale_factor_temporal/spatial {factors} contradict the "
                              f"network's compression {config.stride[:2]}")
    return config
