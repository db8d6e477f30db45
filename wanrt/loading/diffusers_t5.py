"""The diffusers `text_encoder/` layout (a transformers `UMT5EncoderModel`) <-> the official
`models_t5_umt5-xxl-enc-bf16.pth` layout used by `wanrt.models.t5.UMT5Encoder`.

The map is explicit and total: a key it does not know raises, so a checkpoint of another
architecture (a decoder, an lm head, T5 v1.1's shared position bias) cannot load silently.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from torch import Tensor

from wanrt.configs import UMT5_XXL, T5Config
from wanrt.errors import CheckpointError

# transformers ties the encoder's input embedding to `shared`; save_pretrained stores only
# `shared.weight`, but a checkpoint written without deduplication may carry both.
_TIED_EMBEDDING = "encoder.embed_tokens.weight"

_GLOBAL_KEYS = {
    "shared.weight": "token_embedding.weight",
    "encoder.final_layer_norm.weight": "norm.weight",
}

# Per-block suffixes. In the official gated MLP `fc1(x) * gelu(gate(x))`, transformers'
# `gelu(wi_0(x)) * wi_1(x)` puts the activated projection in wi_0. Unlike T5 v1.1, UMT5
# has a relative attention bias in every block, like the official `shared_pos=False`.
_BLOCK_KEYS = {
    "layer.0.layer_norm.weight": "norm1.weight",
    "layer.0.SelfAttention.q.weight": "attn.q.weight",
    "layer.0.SelfAttention.k.weight": "attn.k.weight",
    "layer.0.SelfAttention.v.weight": "attn.v.weight",
    "layer.0.SelfAttention.o.weight": "attn.o.weight",
    "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
    "layer.1.layer_norm.weight": "norm2.weight",
    "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
    "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
    "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
}

_DIFFUSERS_BLOCK = re.compile(r"encoder\.block\.(\d+)\.(.+)")
_OFFICIAL_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


def _rename(state_dict: Mapping[str, Tensor], global_keys: Mapping[str, str],
            block_pattern: re.Pattern[str], block_keys: Mapping[str, str],
            renamed_block_prefix: str, layout: str) -> dict[str, Tensor]:
    renamed: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        block = block_pattern.fullmatch(key)
        if key in global_keys:
            renamed[global_keys[key]] = tensor
        elif block is not None and block.group(2) in block_keys:
            index, suffix = block.groups()
            renamed[f"{renamed_block_prefix}.{index}.{block_keys[suffix]}"] = tensor
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(sorted(unknown)[:8])
        more = f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else ""
        raise CheckpointError(
            f"unknown keys in {layout}-layout umt5 text encoder weights: {shown}{more}")
    return renamed


def to_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """transformers `UMT5EncoderModel` keys -> official encoder keys (tensors shared)."""
    untied = {k: v for k, v in state_dict.items() if k != _TIED_EMBEDDING}
    if "shared.weight" not in untied and _TIED_EMBEDDING in state_dict:
        untied["shared.weight"] = state_dict[_TIED_EMBEDDING]
    return _rename(untied, _GLOBAL_KEYS, _DIFFUSERS_BLOCK, _BLOCK_KEYS, "blocks",
                   layout="transformers")


def to_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official encoder keys -> transformers keys, as `save_pretrained` writes them (the tied
    `encoder.embed_tokens.weight` left out)."""
    return _rename(state_dict, {v: k for k, v in _GLOBAL_KEYS.items()}, _OFFICIAL_BLOCK,
                   {v: k for k, v in _BLOCK_KEYS.items()}, "encoder.block", layout="official")


def config_from_transformers(raw: Mapping[str, Any], *, text_len: int = UMT5_XXL.text_len,
                             source: str = "text_encoder/config.json") -> T5Config:
    """`T5Config` from a transformers UMT5 `config.json`; anything the official encoder
    cannot express is refused.

    `text_len` is how many tokens prompts are padded to; it is a pipeline setting the
    transformers config does not hold, so it is taken from the caller.
    """
    model_type = raw.get("model_type")
    if model_type != "umt5":
        raise CheckpointError(f"{source}: model_type {model_type!r} is not 'umt5'")
    # Absent keys take transformers' UMT5Config defaults; the official encoder hard-codes
    # the activation, the bucket range and the norm epsilon.
    fixed = {"feed_forward_proj": "gated-gelu", "relative_attention_max_distance": 128,
             "layer_norm_epsilon": 1e-6}
    for name, expected in fixed.items():
        if raw.get(name, expected) != expected:
            raise CheckpointError(
                f"{source}: {name}={raw[name]!r} is not supported (umt5-xxl uses {expected!r})")
    required = ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers")
    missing = [name for name in required if name not in raw]
    if missing:
        raise CheckpointError(f"{source}: missing UMT5 config keys {missing}")
    return T5Config(
        vocab_size=raw["vocab_size"], dim=raw["d_model"], dim_attn=raw["num_heads"] * raw["d_kv"],
        dim_ffn=raw["d_ff"], num_heads=raw["num_heads"], num_layers=raw["num_layers"],
        num_buckets=raw.get("relative_attention_num_buckets", 32), shared_pos=False,
        text_len=text_len)
