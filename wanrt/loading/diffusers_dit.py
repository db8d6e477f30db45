"""Key map and config reader for the diffusers layout of the Wan2.2 DiT (`WanTransformer3DModel`)."""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from wanrt.configs import DiTConfig, ModelType
from wanrt.errors import CheckpointError

# diffusers name -> official name, outside the blocks.
TOP_LEVEL_KEYS = {
    "patch_embedding.weight": "patch_embedding.weight",
    "patch_embedding.bias": "patch_embedding.bias",
    "condition_embedder.text_embedder.linear_1.weight": "text_embedding.0.weight",
    "condition_embedder.text_embedder.linear_1.bias": "text_embedding.0.bias",
    "condition_embedder.text_embedder.linear_2.weight": "text_embedding.2.weight",
    "condition_embedder.text_embedder.linear_2.bias": "text_embedding.2.bias",
    "condition_embedder.time_embedder.linear_1.weight": "time_embedding.0.weight",
    "condition_embedder.time_embedder.linear_1.bias": "time_embedding.0.bias",
    "condition_embedder.time_embedder.linear_2.weight": "time_embedding.2.weight",
    "condition_embedder.time_embedder.linear_2.bias": "time_embedding.2.bias",
    "condition_embedder.time_proj.weight": "time_projection.1.weight",
    "condition_embedder.time_proj.bias": "time_projection.1.bias",
    "proj_out.weight": "head.head.weight",
    "proj_out.bias": "head.head.bias",
    "scale_shift_table": "head.modulation",
}

# diffusers name -> official name, inside `blocks.N.`.
BLOCK_KEYS = {
    "scale_shift_table": "modulation",
    **{f"{d_attn}.{d_proj}.{p}": f"{o_attn}.{o_proj}.{p}"
       for d_attn, o_attn in (("attn1", "self_attn"), ("attn2", "cross_attn"))
       for d_proj, o_proj in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"))
       for p in ("weight", "bias")},
    **{f"{attn}.{norm}.weight": f"{o_attn}.{norm}.weight"
       for attn, o_attn in (("attn1", "self_attn"), ("attn2", "cross_attn"))
       for norm in ("norm_q", "norm_k")},
    # The norms swap names: diffusers' affine norm2 (before cross-attention) is the official
    # norm3; the parameter-free norms hold no weights.
    "norm2.weight": "norm3.weight",
    "norm2.bias": "norm3.bias",
    "ffn.net.0.proj.weight": "ffn.0.weight",
    "ffn.net.0.proj.bias": "ffn.0.bias",
    "ffn.net.2.weight": "ffn.2.weight",
    "ffn.net.2.bias": "ffn.2.bias",
}

_TOP_LEVEL_INVERSE = {v: k for k, v in TOP_LEVEL_KEYS.items()}
_BLOCK_INVERSE = {v: k for k, v in BLOCK_KEYS.items()}


def _rename(key: str, top_level: Mapping[str, str], block: Mapping[str, str]) -> str:
    if key.startswith("blocks."):
        _, index, rest = key.split(".", 2)
        if rest in block and index.isdigit():
            return f"blocks.{index}.{block[rest]}"
    elif key in top_level:
        return top_level[key]
    raise CheckpointError(f"unknown DiT key {key!r}: not part of the Wan2.2 transformer")


def official_key(diffusers_key: str) -> str:
    return _rename(diffusers_key, TOP_LEVEL_KEYS, BLOCK_KEYS)


def diffusers_key(official: str) -> str:
    return _rename(official, _TOP_LEVEL_INVERSE, _BLOCK_INVERSE)


def to_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {official_key(k): v for k, v in state_dict.items()}


def to_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {diffusers_key(k): v for k, v in state_dict.items()}


# Input/output channels identify the Wan2.2 variant (Wan2.2 i2v has no CLIP image branch).
MODEL_TYPE_BY_CHANNELS = {(16, 16): ModelType.T2V, (36, 16): ModelType.I2V, (48, 48): ModelType.TI2V}


def config_from_diffusers(raw: Mapping[str, Any], source: str, text_len: int = 512) -> DiTConfig:
    """DiTConfig from a diffusers transformer config.json; text_len is not stored there."""
    def field(name: str) -> Any:
        if name not in raw:
            raise CheckpointError(f"{source}: diffusers transformer config lacks {name!r}")
        return raw[name]

    unsupported = {name: raw.get(name) for name in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")
                   if raw.get(name) is not None}
    if field("qk_norm") != "rms_norm_across_heads":
        unsupported["qk_norm"] = raw["qk_norm"]
    if unsupported:
        raise CheckpointError(f"{source}: not a Wan2.2 transformer (unsupported settings {unsupported})")
    channels = (field("in_channels"), field("out_channels"))
    if channels not in MODEL_TYPE_BY_CHANNELS:
        raise CheckpointError(f"{source}: in/out channels {channels} match no Wan2.2 model")
    return DiTConfig(
        model_type=MODEL_TYPE_BY_CHANNELS[channels],
        in_dim=channels[0], out_dim=channels[1],
        dim=field("num_attention_heads") * field("attention_head_dim"),
        ffn_dim=field("ffn_dim"), num_heads=field("num_attention_heads"),
        num_layers=field("num_layers"), freq_dim=field("freq_dim"), text_dim=field("text_dim"),
        text_len=text_len, patch_size=tuple(field("patch_size")), eps=field("eps"),
        qk_norm=True, cross_attn_norm=field("cross_attn_norm"),
    )
