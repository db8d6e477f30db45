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
    """Materialise (from meta if needed) and fill every parameter; returns `module`."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if any(p.is_meta for p in module.parameters()):
        module.to_empty(device=device)
    for name, param in module.named_parameters():
        if "modulation" in name.split("."):
            values = torch.randn(param.shape, generator=generator) * MODULATION_STD
        elif name.endswith("bias"):
            values = torch.randn(param.shape, generator=generator) * 0.05
        elif param.dim() == 1:
            values = 1 + torch.randn(param.shape, generator=generator) * 0.05
        else:
            fan_in = param[0].numel()
            values = torch.randn(param.shape, generator=generator) / math.sqrt(fan_in)
        param.copy_(values)
    return module
