"""Seeded random weights for smoke models (the demo, tests, benchmarks): never for quality.

Scales keep activations O(1) through any depth: matrices N(0, 1/fan_in), biases N(0, 0.05²),
1-D gains 1 + N(0, 0.05²). The DiT's modulation tables get std 0.3 so the time signal
actually moves the output (the official init would make them tiny).
"""

from __future__ import annotations

import math

import torch
from torch import nn

MODULATION_STD = 0.3


@torch.no_grad()
def randomize_(module: nn.Module, seed: int, device: torch.device | str = "cpu") -> nn.Module:
    """Materialise (from meta if needed) on `device` and fill every parameter there.

    The numbers depend on the seed and the device type (each has its own generator), which
    keeps full-size random models fast to build on a GPU.
    """
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    if any(p.is_meta for p in module.parameters()):
        module.to_empty(device=device)
    for name, param in module.named_parameters():
        values = torch.randn(param.shape, generator=generator, device=device)
        if "modulation" in name.split("."):
            values *= MODULATION_STD
        elif name.endswith("bias"):
            values *= 0.05
        elif param.dim() == 1:
            values = 1 + values * 0.05
        else:
            values /= math.sqrt(param[0].numel())  # fan_in of a Linear/Conv weight
        param.copy_(values)
    return module
