"""Where a benchmark run's models come from, and the pipeline each strategy runs.

Every run gets fresh models with identical weights (random from fixed seeds, or loaded
from the same checkpoint): block streaming re-points weights at its own buffers, so a
model is never shared between two measured runs.
"""

from __future__ import annotations

import tempfile
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from wanrt.configs import ModelType, TaskSpec, parse_size
from wanrt.loading.checkpoint import Expert, load_dit, load_vae, locate_checkpoint
from wanrt.models.dit import WanDiT
from wanrt.pipelines import MemoryBudget, Pipeline, StreamingConfig
from wanrt.random_weights import randomize_
from wanrt.runtime.planner import Precision

from wanrt.bench.scenarios import Scenario, Weights

if TYPE_CHECKING:
    from wanrt.engines.base import Engine

# Seed offsets per component, so that experts, VAE and T5 never share random numbers.
_VAE_SEED_OFFSET, _T5_SEED_OFFSET = 10, 20


class Strategy(str, Enum):
    WANRT = "wanrt"        # the scenario's precision, planned placement / block streaming
    OFFICIAL = "official"  # the official code's: bf16 experts moved whole to the device


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs as the official code; float32 on CPUs (as `Pipeline.from_pretrained`)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_device() -> torch.device:
    """Random numbers for full-size models are drawn on the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _with_loader_dtypes(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """On `meta`: `dtype` everywhere except the model's float32 islands, as the loader casts."""
    keep = tuple(getattr(model, "keep_in_fp32", ()))
    for name, param in model.named_parameters():
        keep_fp32 = any(part in keep for part in name.split("."))
        param.data = param.data.to(torch.float32 if keep_fp32 else dtype)
    return model


def random_dit(config, seed: int, device: torch.device, dtype: torch.dtype) -> WanDiT:
    """A random DiT on `device` with the loader's dtypes; never materialised in float32."""
    with torch.device("meta"):
        model = _with_loader_dtypes(WanDiT(config), dtype)
    return randomize_(model, seed=seed, device=device).eval().requires_grad_(False)


def random_vae(task: TaskSpec, seed: int, device: torch.device):
    from wanrt.models.vae import WanVAE

    with torch.device("meta"):
        vae = WanVAE(task.vae)
    return randomize_(vae, seed=seed, device=device).eval().requires_grad_(False)


def random_text_encoder(task: TaskSpec, seed: int, device: torch.device, dtype: torch.dtype):
    """A random umt5 encoder of the task's size behind a toy tokenizer: the encoder runs
    every prompt at full `text_len`, so its cost is that of the real one."""
    from wanrt.demo import write_toy_tokenizer
    from wanrt.models.t5 import UMT5Encoder
    from wanrt.models.tokenizer import PromptTokenizer
    from wanrt.text_encoder import TextEncoder

    with torch.device("meta"):
        encoder = UMT5Encoder(task.t5).to(dtype)
    encoder = randomize_(encoder, seed=seed, device=device).cpu().eval().requires_grad_(False)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = PromptTokenizer.from_folder(write_toy_tokenizer(Path(folder)), text_len=task.t5.text_len)
    return TextEncoder(tokenizer, encoder)


def experts_of(task: TaskSpec) -> tuple[Expert, ...]:
    return (Expert.HIGH_NOISE, Expert.LOW_NOISE) if task.is_moe else (Expert.ONLY,)


def conditioning_image(scenario: Scenario) -> Tensor | None:
    """i2v needs an image: a seeded random one at the scenario's size."""
    if scenario.spec.dit.model_type is not ModelType.I2V:
        return None
    width, height = parse_size(scenario.size)
    generator = torch.Generator().manual_seed(scenario.seed)
    return torch.rand(3, height, width, generator=generator) * 2 - 1


class ModelSource:
    """The scenario's weights: random (seeded) or a checkpoint folder."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.task = scenario.spec
        self.files = (locate_checkpoint(Path(scenario.ckpt_dir), self.task)
                      if scenario.weights is Weights.CHECKPOINT else None)

    def dit_models(self, dtype: torch.dtype) -> dict[Expert, WanDiT]:
        """Every expert in host memory, unquantized (what the diffusers baseline converts)."""
        if self.files is not None:
            return {expert: load_dit(folder, expect=self.task.dit, dtype=dtype)
                    for expert, folder in self.files.dit_dirs.items()}
        device = build_device()
        return {expert: random_dit(self.task.dit, self.scenario.seed + offset, device, dtype).cpu()
                for offset, expert in enumerate(experts_of(self.task))}

    def vae_model(self):
        if self.files is not None:
            return load_vae(self.files.vae, self.task.vae, dtype=torch.float32)
        return random_vae(self.task, self.scenario.seed + _VAE_SEED_OFFSET, build_device()).cpu()

    def pipeline(self, strategy: Strategy, device: torch.device,
                 with_text_encoder: bool = True) -> tuple[Pipeline, Engine]:
        """The run's pipeline and the engine to run its experts and VAE steps through (the
        caller attaches it: the harness times the engine's runners). Without the text
        encoder, runs need their text embeddings given."""
        from wanrt.engines.base import EngineKind, EngineOptions, make_engine

        scenario, dtype = self.scenario, compute_dtype(device)
        official = strategy is Strategy.OFFICIAL
        precision = Precision.BF16 if official else scenario.precision
        engine = make_engine(EngineKind.EAGER if official else scenario.engine,
                             EngineOptions(self.task, device, precision.value))
        forced_streaming = not official and scenario.resident_blocks is not None
        # The planner runs for wanrt on a GPU; the official strategy has no planner, and an
        # explicit resident_blocks replaces it.
        memory = (MemoryBudget.detect(device, scenario.vram_gib, scenario.ram_gib)
                  if device.type == "cuda" and not official and not forced_streaming else None)
        if self.files is not None:
            pipeline = Pipeline.from_pretrained(scenario.ckpt_dir, self.task.name, device=device, dtype=dtype,
                                                precision=precision.value)
            pipeline.memory = memory
        else:
            experts = self.dit_models(dtype)
            if precision is not Precision.BF16:
                from wanrt.export.quantize import quantize

                for model in experts.values():
                    quantize(model, precision.value)
            text_encoder = (random_text_encoder(self.task, scenario.seed + _T5_SEED_OFFSET, build_device(), dtype)
                            if with_text_encoder else None)
            pipeline = Pipeline.from_models(self.task, experts, vae=self.vae_model(), device=device,
                                            dtype=dtype, memory=memory, text_encoder=text_encoder)
            pipeline.precision = precision.value
            pipeline.quant_summaries.update({expert.value: model.quant_report.summary()
                                             for expert, model in experts.items() if hasattr(model, "quant_report")})
        if forced_streaming:
            pipeline.streaming = StreamingConfig(resident_blocks=scenario.resident_blocks)
        return pipeline, engine
