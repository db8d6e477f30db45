"""The `compile` engine: torch.compile of the repeated block only (regional compilation).

Every block's `forward` is compiled, not its `__call__`: the block streamer's hooks stay
eager around it, and since all blocks share one code object, dynamo traces one graph for
all blocks of both experts (their tensors are graph inputs), recompiling only for a new
token count. No artifact is written; torch's own caches make later runs compile faster.
"""

from __future__ import annotations

from typing import Any

import torch

from wanrt.engines.base import Engine, EngineKind
from wanrt.loading.checkpoint import Expert
from wanrt.models.dit import WanDiT


def compile_blocks(model: WanDiT, **compile_options: Any) -> WanDiT:
    """torch.compile each repeated block's forward in place; returns the model."""
    for block in getattr(model, model.repeated_blocks):
        block.forward = torch.compile(block.forward, **compile_options)
    return model


class CompiledEngine(Engine):
    kind = EngineKind.COMPILE

    def wrap_expert(self, expert: Expert, model: WanDiT) -> WanDiT:
        return compile_blocks(model)
