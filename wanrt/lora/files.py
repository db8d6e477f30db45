"""Reading a LoRA: a `.safetensors` file, a weights-only `.pt`/`.ckpt`/`.pth`, or a PEFT
adapter folder (`adapter_config.json` + `adapter_model.safetensors`, as the official
Wan2.2-Animate relighting LoRA ships). Pickled objects are never unpickled.

`LoraFile.plan` checks every key against the model's parameters, from the shapes alone,
so a bad file is refused before any weight is read or any sampling starts.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from wanrt.errors import CheckpointError
from wanrt.lora.formats import KeyMap, LoraFormat, Part, detect_format, split_key
from wanrt.loading.files import load_pth, read_safetensors_header
from wanrt.loading.state import key_listing


class LoraError(CheckpointError):
    """A LoRA file that cannot be applied to the model; the message names file and keys."""


PEFT_CONFIG = "adapter_config.json"
# diffusers' `save_lora_weights` / `save_lora_adapter` keep the LoraConfig here, in the
# safetensors metadata, instead of `.alpha` tensors.
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


@dataclass(frozen=True)
class PeftConfig:
    """The scale PEFT gives each module: lora_alpha / r (or / sqrt(r) with rsLoRA), with
    per-module overrides in `alpha_pattern` / `rank_pattern` (PEFT matches a pattern key
    against the end of the module name)."""

    alpha: float
    rank: int
    use_rslora: bool = False
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    rank_pattern: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def from_json(cls, text: str, source: str) -> "PeftConfig":
        """A PEFT LoraConfig as JSON; diffusers' pipeline-level metadata prefixes each
        field with the component (`transformer.lora_alpha`)."""
        try:
            raw = {key.removeprefix("transformer."): value for key, value in json.loads(text).items()}
            if raw.get("use_dora"):
                raise LoraError(f"{source}: DoRA adapters are not supported; use a plain LoRA")
            return cls(float(raw["lora_alpha"]), int(raw["r"]), bool(raw.get("use_rslora", False)),
                       dict(raw.get("alpha_pattern") or {}), dict(raw.get("rank_pattern") or {}))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LoraError(f"{source}: not a PEFT LoRA config ({type(exc).__name__}: {exc})") from None

    def _lookup(self, patterns: Mapping[str, float], module: str, default: float) -> float:
        for pattern, value in patterns.items():
            if re.fullmatch(rf"(.*\.)?{pattern}", module):
                return value
        return default

    def alpha_and_rank(self, module: str) -> tuple[float, int]:
        """(lora_alpha, r) of `module`, patterns first."""
        return (self._lookup(self.alpha_pattern, module, self.alpha),
                int(self._lookup(self.rank_pattern, module, self.rank)))


@dataclass(frozen=True)
class LoraPatch:
    """What one LoRA changes in one parameter: a low-rank pair or a full delta (tensor keys)."""

    parameter: str
    module: str                 # the module path as the file names it (for messages, PEFT patterns)
    down: str | None = None
    up: str | None = None
    alpha: str | None = None
    diff: str | None = None


@dataclass(frozen=True)
class LoraPlan:
    patches: list[LoraPatch]
    skipped: list[str]          # keys of modules the model lacks and that are harmless


class LoraFile:
    """One LoRA on disk; its tensors are read only when merged (and not kept after)."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        self.source = path
        self.peft: PeftConfig | None = None
        if path.is_dir():
            weights = next((path / name for name in PEFT_WEIGHTS if (path / name).is_file()), None)
            if not (path / PEFT_CONFIG).is_file() or weights is None:
                raise LoraError(f"{path}: a LoRA folder must be a PEFT adapter ({PEFT_CONFIG} and "
                                f"{PEFT_WEIGHTS[0]})")
            self.peft = PeftConfig.from_json((path / PEFT_CONFIG).read_text(), str(path / PEFT_CONFIG))
            path = weights
        if not path.is_file():
            raise LoraError(f"{path}: LoRA file not found")
        self.path = path
        self._tensors: dict[str, Tensor] | None = None
        if path.suffix == ".safetensors":
            self.shapes = {key: info.shape for key, info in read_safetensors_header(path).items()}
            with safe_open(str(path), framework="pt") as handle:
                metadata = (handle.metadata() or {}).get(DIFFUSERS_METADATA_KEY)
            if metadata is not None and self.peft is None:
                self.peft = PeftConfig.from_json(metadata, f"{path} ({DIFFUSERS_METADATA_KEY})")
        elif path.suffix in _PICKLE_SUFFIXES:
            # A pickle container: torch's weights-only unpickler refuses anything but tensors.
            # The official Animate relighting LoRA is `torch.save({'state_dict': peft_state})`.
            self._tensors = load_pth(path, wrapper_key="state_dict")
            self.shapes = {key: tuple(t.shape) for key, t in self._tensors.items()}
        else:
            raise LoraError(f"{path}: unknown LoRA file type; use .safetensors (or a weights-only .pt/.ckpt)")
        self.format = detect_format(self.shapes)

    def read(self) -> dict[str, Tensor]:
        """Every tensor of the file (a `.pt`/`.ckpt` was read whole when opened)."""
        return self._tensors if self._tensors is not None else load_file(str(self.path))

    def plan(self, parameters: Mapping[str, tuple[int, ...]]) -> LoraPlan:
        """Map every key to a parameter of the model with `parameters` (name -> shape) and
        check ranks and shapes; any key that fits nothing is an error listing the keys."""
        key_map = KeyMap(self.format, parameters)
        groups: dict[tuple[str, str], dict[Part, str]] = defaultdict(dict)
        unknown, skipped, problems = [], [], []
        for key in self.shapes:
            split = split_key(key)
            if split is None:
                unknown.append(key)
                continue
            path, part = split
            parameter = key_map.parameter(path, part)
            if parameter is None:
                (skipped if key_map.is_harmless(path) else unknown).append(key)
                continue
            # A module's pair and alpha share one group; deltas each form their own.
            kind = "lora" if part in (Part.DOWN, Part.UP, Part.ALPHA) else part.value
            groups[(path, kind)][part] = key
        if unknown:
            raise LoraError(f"{self.source}: {len(unknown)} {self.format.value}-format LoRA keys match no "
                            f"parameter of the model: {key_listing(unknown)}; is this LoRA for another model?")
        patches = []
        for (path, kind), parts in groups.items():
            parameter = key_map.parameter(path, next(iter(parts)))
            shape = parameters[parameter]
            if kind == "lora":
                if Part.DOWN not in parts or Part.UP not in parts:
                    missing = "lora_up/lora_B" if Part.UP not in parts else "lora_down/lora_A"
                    problems.append(f"{path}: no {missing} weight (an incomplete pair)")
                    continue
                problem = self._pair_problem(path, self.shapes[parts[Part.DOWN]], self.shapes[parts[Part.UP]], shape)
                if problem:
                    problems.append(problem)
                    continue
                patches.append(LoraPatch(parameter, path, down=parts[Part.DOWN], up=parts[Part.UP],
                                         alpha=parts.get(Part.ALPHA)))
            else:
                (diff_key,) = parts.values()
                if self.shapes[diff_key] != shape:
                    problems.append(f"{diff_key}: shape {list(self.shapes[diff_key])} but {parameter} is {list(shape)}")
                    continue
                patches.append(LoraPatch(parameter, path, diff=diff_key))
        if problems:
            raise LoraError(f"{self.source}: does not fit the model: {key_listing(problems)}")
        return LoraPlan(patches, sorted(skipped))

    def _pair_problem(self, module: str, down: tuple[int, ...], up: tuple[int, ...],
                      weight: tuple[int, ...]) -> str | None:
        if len(down) < 2 or len(up) < 2 or up[1] != down[0]:
            return f"{module}: rank mismatch (lora_down {list(down)}, lora_up {list(up)})"
        if up[0] != weight[0] or math.prod(down[1:]) != math.prod(weight[1:]):
            return (f"{module}: the pair makes a [{up[0]}, {math.prod(down[1:])}] delta but the weight "
                    f"is {list(weight)}")
        if self.peft is not None and self.peft.alpha_and_rank(module)[1] != down[0]:
            return f"{module}: rank {down[0]} but the adapter config says r={self.peft.alpha_and_rank(module)[1]}"
        return None

    def scale(self, patch: LoraPatch, strength: float, tensors: Mapping[str, Tensor]) -> float:
        """strength x alpha / rank; without an alpha, strength alone."""
        rank = tensors[patch.down].shape[0]
        if patch.alpha is not None:
            return strength * float(tensors[patch.alpha]) / rank
        if self.peft is not None:
            alpha, rank = self.peft.alpha_and_rank(patch.module)
            return strength * alpha / (math.sqrt(rank) if self.peft.use_rslora else rank)
        return strength

    def delta(self, patch: LoraPatch, strength: float, tensors: Mapping[str, Tensor],
              device: torch.device) -> Tensor:
        """The float32 change of `patch.parameter` (flat [out, in...] for a pair), from the
        file's `tensors`."""
        if patch.diff is not None:
            return strength * tensors[patch.diff].to(device, torch.float32)
        up = tensors[patch.up].to(device, torch.float32).flatten(1)
        down = tensors[patch.down].to(device, torch.float32).flatten(1)
        return self.scale(patch, strength, tensors) * (up @ down)

