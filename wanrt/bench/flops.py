"""Model FLOPs from the configs and token counts, and the device peaks they are held against.

A FLOP here is one multiply or one add: a matmul `[m, k] @ [k, n]` is `2·m·k·n`, the count
`torch.utils.flop_counter` uses. Only matmuls and convolutions are counted (norms, RoPE,
activations and residual adds are a fraction of a percent at these widths).

* DiT and T5: analytic, per forward (`dit_forward_flops`, `t5_flops`); the tests check
  them against `FlopCounterMode` on the tiny models and against hand-computed numbers for
  the real configs.
* VAE decode: counted, not derived: the decoder runs on the `meta` device under
  `FlopCounterMode` (shapes only, no memory, no weights), which follows the causal
  per-step loop exactly. Attention there decomposes to counted matmuls; on a CPU the fused
  attention kernel is not counted, so real-device counts would be lower.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from wanrt.configs import DiTConfig, ModelType, T5Config, TaskSpec, VAEConfig
from wanrt.runtime.planner import token_grid


@dataclass(frozen=True)
class DiTFlops:
    """One DiT forward (batch 1), split by where the FLOPs go."""

    patch_embedding: int
    text_embedding: int
    time_embedding: int   # time MLP and the 6·dim projection, once per distinct timestep
    blocks: int
    head: int

    @property
    def total(self) -> int:
        return self.patch_embedding + self.text_embedding + self.time_embedding + self.blocks + self.head

    def to_dict(self) -> dict[str, int]:
        return {"patch_embedding": self.patch_embedding, "text_embedding": self.text_embedding,
                "time_embedding": self.time_embedding, "blocks": self.blocks, "head": self.head,
                "total": self.total}


def block_flops(config: DiTConfig, tokens: int, text_len: int | None = None) -> int:
    """One transformer block on `tokens` video tokens.

    Cross-attention's k/v project the *embedded* context, whose width is `dim` (the
    text_dim -> dim MLP runs once per forward, in `text_embedding`), hence `Lt·d²`."""
    d, f, lt = config.dim, config.ffn_dim, config.text_len if text_len is None else text_len
    self_attention = 4 * 2 * tokens * d * d + 2 * 2 * tokens * tokens * d   # q,k,v,o + QK^T, PV
    cross_attention = (2 * 2 * tokens * d * d + 2 * 2 * lt * d * d          # q,o + k,v
                       + 2 * 2 * tokens * lt * d)                            # QK^T, PV
    ffn = 2 * 2 * tokens * d * f
    return self_attention + cross_attention + ffn


def dit_forward_flops(config: DiTConfig, tokens: int, per_token_timesteps: bool = False) -> DiTFlops:
    """A forward on `tokens` video tokens with the context zero-padded to `text_len`
    (as the model always does). `per_token_timesteps` is ti2v with an image, whose time
    MLP runs on every token instead of once."""
    d, patch = config.dim, math.prod(config.patch_size)
    timestep_rows = tokens if per_token_timesteps else 1
    return DiTFlops(
        patch_embedding=2 * tokens * config.in_dim * patch * d,
        text_embedding=2 * config.text_len * (config.text_dim * d + d * d),
        time_embedding=2 * timestep_rows * (config.freq_dim * d + d * d + d * 6 * d),
        blocks=config.num_layers * block_flops(config, tokens),
        head=2 * tokens * d * patch * config.out_dim,
    )


def t5_flops(config: T5Config, prompts: int = 2) -> int:
    """The encoder on `prompts` sequences of `text_len` tokens (the tokenizer pads every
    prompt to text_len and the encoder runs all of them; a run encodes the prompt and the
    negative prompt)."""
    lt = config.text_len
    per_layer = (4 * 2 * lt * config.dim * config.dim_attn          # q, k, v, o
                 + 2 * 2 * lt * lt * config.dim_attn                # QK^T, weights·V
                 + 3 * 2 * lt * config.dim * config.dim_ffn)        # gated FFN: fc1, gate, fc2
    return prompts * config.num_layers * per_layer


@functools.lru_cache(maxsize=None)
def vae_decode_flops(config: VAEConfig, latent_grid: tuple[int, int, int]) -> int:
    """Counted on `meta` (see the module docstring): the decode of `[1, z_dim, *grid]`."""
    from torch.utils.flop_counter import FlopCounterMode

    from wanrt.models.vae import WanVAE

    with torch.device("meta"):
        vae = WanVAE(config)
        latents = torch.zeros(1, config.z_dim, *latent_grid)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        for _ in vae.iter_decode(latents):
            pass
    return counter.get_total_flops()


@dataclass(frozen=True)
class RunFlops:
    """What one scenario's run computes, component by component."""

    tokens: int
    latent_grid: tuple[int, int, int]  # (F, h, w) of the latents
    dit_forward: DiTFlops
    forwards_per_step: int
    steps: int
    t5: int
    vae_decode: int

    @property
    def per_step(self) -> int:
        return self.forwards_per_step * self.dit_forward.total

    @property
    def sampling(self) -> int:
        return self.steps * self.per_step

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "latent_grid": list(self.latent_grid), "dit_forward": self.dit_forward.to_dict(),
                "forwards_per_step": self.forwards_per_step, "per_step": self.per_step,
                "steps": self.steps, "sampling": self.sampling, "t5": self.t5,
                "vae_decode": self.vae_decode, "vae_decode_method": "FlopCounterMode on meta",
                "dit_t5_method": "analytic (matmuls and convolutions)"}


def run_flops(task: TaskSpec, size: str, frames: int, steps: int, image: bool = False,
              forwards_per_step: int = 2) -> RunFlops:
    """Classifier-free guidance runs two forwards per step (cond and uncond)."""
    grid = token_grid(task, size, frames)
    tokens = math.prod(grid)
    _, patch_h, patch_w = task.dit.patch_size
    latent_grid = (grid[0], grid[1] * patch_h, grid[2] * patch_w)
    per_token = task.dit.model_type is ModelType.TI2V and image
    return RunFlops(tokens=tokens, latent_grid=latent_grid, dit_forward=dit_forward_flops(task.dit, tokens, per_token),
                    forwards_per_step=forwards_per_step, steps=steps, t5=t5_flops(task.t5),
                    vae_decode=vae_decode_flops(task.vae, latent_grid))


# ---------------------------------------------------------------------- device peaks


@dataclass(frozen=True)
class DevicePeak:
    """Dense tensor-core peaks (no sparsity) from NVIDIA's datasheets, TFLOP/s (TOP/s for
    int8). `None` where the device has no such tensor-core path."""

    name: str
    bf16: float
    fp8: float | None
    int8: float | None

    def for_precision(self, matmul_precision: str) -> float | None:
        return {"bf16": self.bf16, "fp8": self.fp8, "int8": self.int8}.get(matmul_precision)


# Matched in order against `torch.cuda.get_device_name()`, so the specific variants
# (PCIe, NVL) come before the plain name, which is the SXM part ("NVIDIA H100 80GB HBM3").
DEVICE_PEAKS: tuple[tuple[str, DevicePeak], ...] = (
    ("H100 PCIe", DevicePeak("H100 PCIe", 756.0, 1513.0, 1513.0)),
    ("H100 NVL", DevicePeak("H100 NVL", 835.0, 1671.0, 1671.0)),
    ("H100", DevicePeak("H100 SXM", 989.0, 1979.0, 1979.0)),
    ("H200 NVL", DevicePeak("H200 NVL", 835.0, 1671.0, 1671.0)),
    ("H200", DevicePeak("H200 SXM", 989.0, 1979.0, 1979.0)),
    # GeForce peaks with float32 accumulation (what bf16 matmuls in PyTorch use).
    ("RTX 4090", DevicePeak("RTX 4090", 165.2, 330.3, 660.6)),
    ("A100", DevicePeak("A100", 312.0, None, 624.0)),
    ("L40S", DevicePeak("L40S", 362.0, 733.0, 733.0)),
)


def device_peak(device_name: str) -> DevicePeak | None:
    """The peak table entry for a device name; None (no ratio reported) when unknown."""
    lowered = device_name.lower()
    for pattern, peak in DEVICE_PEAKS:
        if pattern.lower() in lowered:
            return peak
    return None
