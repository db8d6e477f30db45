"""Builders for the diffusers/transformers classes at a wanrt config's shape, and a writer
of a whole diffusers-layout checkpoint made by those libraries themselves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from wanrt.configs import DiTConfig, T5Config, TaskSpec, VAEConfig
from wanrt.loading import diffusers_dit, diffusers_t5, diffusers_vae
from wanrt.loading.checkpoint import Expert, locate_checkpoint
from wanrt.loading.files import iter_safetensors, load_pth, safetensors_shards


def diffusers_transformer(diffusers, config: DiTConfig):
    return diffusers.WanTransformer3DModel(
        patch_size=config.patch_size, num_attention_heads=config.num_heads,
        attention_head_dim=config.head_dim, in_channels=config.in_dim, out_channels=config.out_dim,
        text_dim=config.text_dim, freq_dim=config.freq_dim, ffn_dim=config.ffn_dim,
        num_layers=config.num_layers, eps=config.eps)


def diffusers_vae_model(diffusers, config: VAEConfig):
    wan22 = config.version.value == "2.2"
    pixels = dict(is_residual=True, in_channels=12, out_channels=12, patch_size=2,
                  scale_factor_spatial=16) if wan22 else {}
    return diffusers.AutoencoderKLWan(
        base_dim=config.dim, decoder_base_dim=config.dec_dim, z_dim=config.z_dim,
        dim_mult=list(config.dim_mult), num_res_blocks=config.num_res_blocks,
        temperal_downsample=list(config.temporal_downsample),
        latents_mean=list(config.latent_mean), latents_std=list(config.latent_std), **pixels)


def transformers_umt5(transformers, config: T5Config):
    return transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=config.vocab_size, d_model=config.dim, d_kv=config.dim_attn // config.num_heads,
        d_ff=config.dim_ffn, num_heads=config.num_heads, num_layers=config.num_layers,
        relative_attention_num_buckets=config.num_buckets, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu"))


def _official_dit_state(folder: Path) -> dict:
    state = {}
    for shard in safetensors_shards(folder, "diffusion_pytorch_model"):
        state.update(iter_safetensors(shard))
    return state


def write_diffusers_checkpoint(official_root: Path, task: TaskSpec, dest: Path) -> Path:
    """The same weights as an official-layout checkpoint, saved by diffusers/transformers."""
    import diffusers
    import transformers

    official = locate_checkpoint(official_root, task)
    dest.mkdir(parents=True)
    (dest / "model_index.json").write_text(json.dumps(
        {"_class_name": "WanPipeline", "boundary_ratio": task.sample.boundary}))
    folders = {Expert.HIGH_NOISE: "transformer", Expert.LOW_NOISE: "transformer_2", Expert.ONLY: "transformer"}
    for expert, folder in official.dit_dirs.items():
        model = diffusers_transformer(diffusers, task.dit)
        model.load_state_dict(diffusers_dit.to_diffusers(_official_dit_state(folder)), strict=True)
        model.save_pretrained(dest / folders[expert], max_shard_size="200KB")
    vae = diffusers_vae_model(diffusers, task.vae)
    vae.load_state_dict(diffusers_vae.to_diffusers(load_pth(official.vae)), strict=True)
    vae.save_pretrained(dest / "vae")
    encoder = transformers_umt5(transformers, task.t5)
    state = {k: v.float() for k, v in load_pth(official.t5).items()}
    result = encoder.load_state_dict(diffusers_t5.to_diffusers(state), strict=False)
    # transformers ties embed_tokens to `shared`, which is the one stored.
    assert not result.unexpected_keys and set(result.missing_keys) <= {"encoder.embed_tokens.weight"}
    encoder.save_pretrained(dest / "text_encoder")
    shutil.copytree(official.tokenizer, dest / "tokenizer")
    return dest
