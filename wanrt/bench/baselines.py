"""The diffusers baseline: `diffusers.WanPipeline` with the same weights, noise and text
embeddings as the wanrt run, under diffusers' own offload.

The weights are the scenario's (random or a checkpoint, either layout), converted with
wanrt's diffusers key map into diffusers' `WanTransformer3DModel`/`AutoencoderKLWan`;
diffusers' text encoder is not run: the wanrt run's embeddings go in as `prompt_embeds`,
zero-padded to `text_len` as diffusers pads its own. The baseline therefore measures
sampling and the VAE decode. diffusers is optional: without it the baseline is skipped
with a note. (The official strategy, the other baseline, is a `Pipeline`:
`wanrt.bench.models.Strategy.OFFICIAL`.)
"""

from __future__ import annotations

import importlib.util
import os
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from wanrt.configs import DiTConfig, ModelType, VAEConfig
from wanrt.loading import diffusers_dit, diffusers_vae
from wanrt.loading.checkpoint import Expert
from wanrt.pipelines import ResolvedRequest, TextEmbeddings

from wanrt.bench.measure import RunRecorder
from wanrt.bench.models import ModelSource, compute_dtype


class DiffusersOffload(str, Enum):
    NONE = "none"    # every model on the device (CPU runs)
    MODEL = "model"  # enable_model_cpu_offload: whole models swapped (needs accelerate)
    GROUP = "group"  # enable_group_offload: block-level groups prefetched on a CUDA stream


# The share of host RAM that diffusers' up-front pinned weight copies may take with the originals.
HOST_FRACTION_FOR_PINNED_COPIES = 0.7


class BaselineSkipped(Exception):
    """The baseline cannot run here; the message is the note the report carries."""


def diffusers_available() -> bool:
    return importlib.util.find_spec("diffusers") is not None


def choose_offload(device: torch.device, vram_gib: float | None) -> tuple[DiffusersOffload, str]:
    """diffusers' best fit for the setting, and why it was chosen."""
    if device.type != "cuda":
        return DiffusersOffload.NONE, "CPU run: no offload"
    if vram_gib is not None:
        return DiffusersOffload.GROUP, "VRAM cap: block-level group offload with streams (a whole expert may not fit)"
    if importlib.util.find_spec("accelerate") is not None:
        return DiffusersOffload.MODEL, "enable_model_cpu_offload (whole-model swap, as the official code)"
    return DiffusersOffload.GROUP, "accelerate is not installed: block-level group offload with streams"


def transformer_kwargs(config: DiTConfig) -> dict[str, Any]:
    """`WanTransformer3DModel` arguments for a wanrt DiT config."""
    return dict(patch_size=config.patch_size, num_attention_heads=config.num_heads,
                attention_head_dim=config.head_dim, in_channels=config.in_dim, out_channels=config.out_dim,
                text_dim=config.text_dim, freq_dim=config.freq_dim, ffn_dim=config.ffn_dim,
                num_layers=config.num_layers, eps=config.eps)


def vae_kwargs(config: VAEConfig) -> dict[str, Any]:
    """`AutoencoderKLWan` arguments for a wanrt VAE config."""
    wan22 = config.version.value == "2.2"
    pixels = dict(is_residual=True, in_channels=12, out_channels=12, patch_size=2,
                  scale_factor_spatial=16) if wan22 else {}
    return dict(base_dim=config.dim, decoder_base_dim=config.dec_dim, z_dim=config.z_dim,
                dim_mult=list(config.dim_mult), num_res_blocks=config.num_res_blocks,
                temperal_downsample=list(config.temporal_downsample),
                latents_mean=list(config.latent_mean), latents_std=list(config.latent_std), **pixels)


def _keep_fp32_as_diffusers_does(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """`dtype` everywhere except the parameters diffusers' `from_pretrained` keeps float32."""
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in model.named_parameters():
        target = torch.float32 if any(part in keep for part in name.split(".")) else dtype
        param.data = param.data.to(target)


def to_diffusers_transformer(diffusers, model, dtype: torch.dtype):
    """The same weights as a diffusers `WanTransformer3DModel` (tensors moved, not copied)."""
    with torch.device("meta"):
        converted = diffusers.WanTransformer3DModel(**transformer_kwargs(model.config))
    converted.load_state_dict(diffusers_dit.to_diffusers(model.state_dict()), strict=True, assign=True)
    # The rotary tables are non-persistent buffers: built for real, not loaded.
    rope = converted.rope
    converted.rope = type(rope)(rope.attention_head_dim, rope.patch_size, rope.max_seq_len)
    _keep_fp32_as_diffusers_does(converted, dtype)
    return converted.eval().requires_grad_(False)


def to_diffusers_vae(diffusers, vae):
    converted = diffusers.AutoencoderKLWan(**vae_kwargs(vae.config))
    converted.load_state_dict(diffusers_vae.to_diffusers(vae.state_dict()), strict=True)
    return converted.float().eval().requires_grad_(False)


def _padded(embedding: Tensor, text_len: int, dtype: torch.dtype) -> Tensor:
    return F.pad(embedding, (0, 0, 0, text_len - embedding.shape[0]))[None].to(dtype)


class DiffusersBaseline:
    """`diffusers.WanPipeline` set up for a scenario (weights converted, offload enabled);
    `run` is the measured part. Raises BaselineSkipped where it cannot run."""

    def __init__(self, source: ModelSource, device: torch.device, shift: float) -> None:
        task = source.task
        if not diffusers_available():
            raise BaselineSkipped("diffusers is not installed (pip install 'wanrt[baselines]')")
        if task.dit.model_type is ModelType.I2V:
            raise BaselineSkipped("the diffusers baseline runs text-to-video (t2v, ti2v); i2v is not covered")
        import diffusers

        self.task, self.device, self.dtype = task, device, compute_dtype(device)
        offload, reason = choose_offload(device, source.scenario.vram_gib)
        # Converted one expert at a time: the converted model takes over the tensors.
        self.transformers = {expert: to_diffusers_transformer(diffusers, model, self.dtype)
                             for expert, model in source.dit_models(self.dtype).items()}
        self.has_low_noise = Expert.LOW_NOISE in self.transformers
        scheduler = diffusers.UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True,
            num_train_timesteps=task.sample.num_train_timesteps, flow_shift=shift)
        self.pipe = diffusers.WanPipeline(
            tokenizer=None, text_encoder=None, vae=to_diffusers_vae(diffusers, source.vae_model()),
            scheduler=scheduler, transformer=self.transformers.get(Expert.HIGH_NOISE, self.transformers.get(Expert.ONLY)),
            transformer_2=self.transformers.get(Expert.LOW_NOISE), boundary_ratio=task.sample.boundary,
            expand_timesteps=task.dit.model_type is ModelType.TI2V)
        self.pipe.set_progress_bar_config(disable=True)
        if offload is DiffusersOffload.MODEL:  # GPU only
            self.pipe.enable_model_cpu_offload(device=device)
        elif offload is DiffusersOffload.GROUP:  # GPU only; the excluded VAE is placed whole on the device
            # Group offload pins a copy of every weight up front while the originals live on
            # until first use; where two copies would crowd the host, it pins on the fly.
            weight_bytes = sum(p.numel() * p.element_size() for model in self.transformers.values()
                               for p in model.parameters())
            host_bytes = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            low_cpu_mem_usage = 2 * weight_bytes > HOST_FRACTION_FOR_PINNED_COPIES * host_bytes
            if low_cpu_mem_usage:
                reason += "; low_cpu_mem_usage (two pinned copies would not fit the host RAM)"
            self.pipe.enable_group_offload(onload_device=device, offload_type="block_level",
                                           num_blocks_per_group=1, use_stream=True, exclude_modules=["vae"],
                                           low_cpu_mem_usage=low_cpu_mem_usage)
        else:
            self.pipe.to(device)
        self.setup = {"diffusers": diffusers.__version__, "offload": offload.value, "offload_reason": reason,
                      "dtype": str(self.dtype).removeprefix("torch."),
                      "scheduler": "UniPCMultistepScheduler(flow_prediction, use_flow_sigmas)",
                      "text_encoder": "not run: the wanrt run's embeddings are passed as prompt_embeds",
                      "not_measured": "weight conversion and offload set-up"}

    def _expert_at(self, t: int) -> Expert:
        if not self.has_low_noise:
            return Expert.ONLY
        boundary = self.task.sample.boundary * self.task.sample.num_train_timesteps
        return Expert.HIGH_NOISE if t >= boundary else Expert.LOW_NOISE

    def run(self, request: ResolvedRequest, embeddings: TextEmbeddings, noise: Tensor,
            recorder: RunRecorder) -> tuple[Tensor, Tensor]:
        """Sampling and decode from `noise [C, F, h, w]`: latents `[C, F, h, w]` and the
        video `[3, T, H, W]`, float32 on the CPU."""
        task, pipe, device, dtype = self.task, self.pipe, self.device, self.dtype
        for expert, model in self.transformers.items():
            model.register_forward_pre_hook(lambda _m, _a, name=expert.value: recorder.forward_started(name))
            model.register_forward_hook(lambda _m, _a, _o: recorder.forward_finished())

        def on_step(_pipe, index: int, timestep: Tensor, _tensors: dict) -> dict:
            t = int(timestep)
            recorder.step_finished(index, t, self._expert_at(t).value)
            return {}

        text_len = task.dit.text_len
        with torch.no_grad():
            with recorder.phase("sampling"):
                recorder.begin_steps()
                # guide_scale is (low-noise, high-noise); diffusers' `guidance_scale` drives
                # `transformer`, the high-noise expert.
                latents = pipe(prompt_embeds=_padded(embeddings.cond, text_len, dtype).to(device),
                               negative_prompt_embeds=_padded(embeddings.uncond, text_len, dtype).to(device),
                               height=noise.shape[-2] * task.vae_stride[1], width=noise.shape[-1] * task.vae_stride[2],
                               num_frames=request.frame_num, num_inference_steps=request.steps,
                               guidance_scale=request.guide_scale[1],
                               guidance_scale_2=request.guide_scale[0] if self.has_low_noise else None,
                               latents=noise[None].to(device), output_type="latent", return_dict=False,
                               callback_on_step_end=on_step)[0]
            with recorder.phase("decode"):
                config = pipe.vae.config
                mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1).to(latents.device)
                std = torch.tensor(config.latents_std).view(1, -1, 1, 1, 1).to(latents.device)
                video = pipe.vae.decode((latents.float() * std + mean).to(pipe.vae.dtype), return_dict=False)[0]
                video = video.float().cpu()
        return latents[0].float().cpu(), video[0]
