"""Step caching: skip a step's DiT forwards when the output is predicted to barely change,
reusing the last computed residual (output - input).

EasyCache (Zhou et al. 2025, "Less is Enough: Training-Free Video Diffusion Acceleration
via Runtime-Adaptive Caching", H-EmbodVis/EasyCache), which needs no per-model calibration:

- after two computed steps, the transformation rate k = mean|v - v_prev| / mean|x - x_prev|
  (output change over input change between consecutive computed steps);
- at a later step, the predicted relative output change k * mean|x - x_last| / mean|v_last|
  (x_last: the previous step's input, computed or not) is accumulated; while the sum stays
  under the threshold the step reuses v = x + (v_comp - x_comp) of the last computed step,
  otherwise it computes and the sum restarts at 0;
- the first `warmup_steps` (EasyCache4Wan2.2: 7 of 40) and the last step always compute.

wanrt applies it to a whole step (every forward of the guidance together), which is the
official per-branch rule when the guide scale is constant: the guided output is a fixed
linear mix of the branch outputs, so is its residual. An A14B expert switch resets the
cache: k and the residual of one expert say nothing about the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Callable

from torch import Tensor

from wanrt.errors import InputError, parse_choice
from wanrt.loading.checkpoint import Expert

# EasyCache4Wan2.2 retains 7 of 40 steps before caching.
WARMUP_FRACTION = 7 / 40


class CacheKind(str, Enum):
    EASYCACHE = "easycache"


@dataclass(frozen=True)
class StepCacheConfig:
    kind: CacheKind
    threshold: float
    warmup_steps: int | None = None  # default: WARMUP_FRACTION of the run

    @classmethod
    def parse(cls, text: str) -> "StepCacheConfig":
        """`KIND:THRESHOLD[:WARMUP_STEPS]`, e.g. `easycache:0.05`."""
        kind, _, rest = text.partition(":")
        kind = parse_choice(CacheKind, kind, "--cache")
        threshold, _, warmup = rest.partition(":")
        try:
            config = cls(kind, float(threshold), int(warmup) if warmup else None)
        except ValueError:
            raise InputError(f"--cache {text!r} must be KIND:THRESHOLD[:WARMUP_STEPS], e.g. easycache:0.05") from None
        if not config.threshold > 0 or (config.warmup_steps is not None and config.warmup_steps < 1):
            raise InputError(f"--cache {text!r}: the threshold must be > 0 and the warm-up at least 1 step")
        return config

    def warmup_for(self, total_steps: int) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return max(1, math.ceil(WARMUP_FRACTION * total_steps))

    def record(self, total_steps: int) -> dict:
        return {"kind": self.kind.value, "threshold": self.threshold, "warmup_steps": self.warmup_for(total_steps)}


# One step's model output, as `wanrt.pipelines.core.Predict`: (t, expert, latents) ->
# (velocity, guide scale used).
StepPredict = Callable[[float, Expert, Tensor], tuple[Tensor, float]]


def _mean_abs(tensor: Tensor) -> float:
    return tensor.float().abs().mean().item()


class EasyCache:
    """The cache of one run of `total_steps`; `skipped` lists the step indices it reused."""

    def __init__(self, config: StepCacheConfig, total_steps: int) -> None:
        self.threshold = config.threshold
        self.warmup_steps = config.warmup_for(total_steps)
        self.total_steps = total_steps
        self.skipped: list[int] = []
        self._reset(None)
        self._previous_input: Tensor | None = None

    def _reset(self, expert: Expert | None) -> None:
        self.expert = expert
        self.rate: float | None = None
        self.accumulated = 0.0
        self.computed_input: Tensor | None = None
        self.computed_output: Tensor | None = None
        self.scale = 1.0

    def should_compute(self, index: int, expert: Expert, latents: Tensor) -> bool:
        previous, self._previous_input = self._previous_input, latents
        if expert is not self.expert:
            self._reset(expert)
            return True
        if index < self.warmup_steps or index == self.total_steps - 1 or self.rate is None:
            self.accumulated = 0.0
            return True
        self.accumulated += self.rate * _mean_abs(latents - previous) / max(_mean_abs(self.computed_output), 1e-12)
        if self.accumulated < self.threshold:
            return False
        self.accumulated = 0.0
        return True

    def computed(self, latents: Tensor, output: Tensor, scale: float) -> None:
        if self.computed_output is not None:
            input_change = _mean_abs(latents - self.computed_input)
            self.rate = _mean_abs(output - self.computed_output) / input_change if input_change > 0 else None
        self.computed_input, self.computed_output, self.scale = latents, output, scale

    def reused(self, index: int, latents: Tensor) -> tuple[Tensor, float]:
        self.skipped.append(index)
        return latents + (self.computed_output - self.computed_input), self.scale

    def wrap(self, predict: StepPredict, first_index: int) -> StepPredict:
        """`predict` with this cache in front; the run continues at step `first_index`."""
        indices = iter(range(first_index, self.total_steps))

        def cached(t: float, expert: Expert, latents: Tensor) -> tuple[Tensor, float]:
            index = next(indices)
            if not self.should_compute(index, expert, latents):
                return self.reused(index, latents)
            output, scale = predict(t, expert, latents)
            self.computed(latents, output, scale)
            return output, scale
        return cached
