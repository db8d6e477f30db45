"""Merging LoRAs into a built DiT, once, at load.

Each touched parameter is summed in float32 (weight + every LoRA's delta) and cast back
once, so several LoRAs stack without rounding in between. This runs before quantization,
pinning and block streaming: the sampling loop then runs a plain model and never
re-applies a patch per step (the cost that makes ComfyUI's partly loaded 4-step runs
slower than 8 steps).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from wanrt.errors import CheckpointError, InputError
from wanrt.loading.checkpoint import Expert
from wanrt.lora.files import LoraError, LoraFile, LoraPlan


class LoraExpert(str, Enum):
    """Which A14B expert a LoRA patches (a single-DiT task takes `both` only)."""

    BOTH = "both"
    HIGH_NOISE = "high_noise"
    LOW_NOISE = "low_noise"


_FLAGS = {LoraExpert.BOTH: "--lora", LoraExpert.HIGH_NOISE: "--lora-high", LoraExpert.LOW_NOISE: "--lora-low"}
# The Wan2.2-Lightning release: one folder holding a LoRA per expert (its `--lora_dir`).
EXPERT_FILES = {LoraExpert.HIGH_NOISE: "high_noise_model.safetensors",
                LoraExpert.LOW_NOISE: "low_noise_model.safetensors"}


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA as the user asked for it: scale = strength x alpha / rank (strength alone
    when the file stores no alpha)."""

    path: Path
    strength: float = 1.0
    expert: LoraExpert = LoraExpert.BOTH

    @classmethod
    def parse(cls, text: str, expert: LoraExpert = LoraExpert.BOTH) -> "LoraSpec":
        """`PATH[:STRENGTH]` (a `:` followed by a number ends the path; Windows drive
        letters stay part of it)."""
        path, _, strength = text.rpartition(":")
        try:
            return cls(Path(path), float(strength), expert) if path else cls(Path(text), 1.0, expert)
        except ValueError:
            return cls(Path(text), 1.0, expert)

    @property
    def flag(self) -> str:
        return _FLAGS[self.expert]

    def applies_to(self, expert: Expert) -> bool:
        return self.expert is LoraExpert.BOTH or self.expert.value == expert.value


class LoadedLora:
    """A LoRA opened and checked against the DiT's parameter shapes (no weight read yet)."""

    def __init__(self, spec: LoraSpec, parameters: dict[str, tuple[int, ...]]) -> None:
        self.spec = spec
        try:
            self.file = LoraFile(spec.path)
            self.plan: LoraPlan = self.file.plan(parameters)
        except CheckpointError as exc:
            raise LoraError(f"{spec.flag} {exc}") from None

    def record(self) -> dict:
        """What the sidecar keeps: file, its SHA-256, strength, expert, format."""
        from wanrt.hashing import file_sha256

        return {"file": str(self.spec.path), "sha256": file_sha256(self.file.path),
                "strength": self.spec.strength, "expert": self.spec.expert.value,
                "format": self.file.format.value, "patched_parameters": len(self.plan.patches),
                "skipped_keys": self.plan.skipped}


def check_loras(specs: Sequence[LoraSpec], parameters: dict[str, tuple[int, ...]],
                experts: Sequence[Expert]) -> list[LoadedLora]:
    """Open and check every LoRA before any model loads: files, keys, ranks, shapes, and
    that `--lora-high/--lora-low` name an expert the task has. A `--lora` folder in the
    Wan2.2-Lightning layout becomes one LoRA per expert."""
    specs = [expanded for spec in specs for expanded in _per_expert_files(spec)]
    for spec in specs:
        if spec.expert is not LoraExpert.BOTH and not any(spec.applies_to(e) for e in experts):
            raise InputError(f"{spec.flag} {spec.path}: this task has a single DiT; use --lora")
    return [LoadedLora(spec, parameters) for spec in specs]


def _per_expert_files(spec: LoraSpec) -> list[LoraSpec]:
    folder = spec.path
    if spec.expert is not LoraExpert.BOTH or not all((folder / name).is_file() for name in EXPERT_FILES.values()):
        return [spec]
    return [LoraSpec(folder / name, spec.strength, expert) for expert, name in EXPERT_FILES.items()]


def parameter_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def merge_loras(model: nn.Module, loras: Sequence[LoadedLora]) -> int:
    """Add every LoRA's delta to `model`'s weights in place; returns the parameters changed.

    A LoRA at strength 0 changes nothing (its keys are still checked)."""
    parameters = dict(model.named_parameters())
    shapes = {name: tuple(p.shape) for name, p in parameters.items()}
    by_parameter = defaultdict(list)
    for lora in loras:
        plan = lora.file.plan(shapes)  # the model may differ from the one checked up front
        if lora.spec.strength != 0:
            tensors = lora.file.read()  # memory-mapped; released when the merge is done
            for patch in plan.patches:
                by_parameter[patch.parameter].append((lora.file, patch, lora.spec.strength, tensors))
    with torch.no_grad():
        for name, patches in by_parameter.items():
            parameter = parameters[name]
            merged = parameter.detach().to(torch.float32, copy=True)
            for file, patch, strength, tensors in patches:
                merged += file.delta(patch, strength, tensors, parameter.device).view(parameter.shape)
            parameter.copy_(merged)
    return len(by_parameter)
