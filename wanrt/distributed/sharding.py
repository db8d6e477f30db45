"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the DiT experts and the T5 encoder.

Inference only: each rank keeps 1/N of every block's weights and gathers a block's full
weights just before it runs, freeing them right after (`reshard_after_forward`), so N GPUs
together hold one copy of the model. Parameters are frozen first: FSDP's uniform-dtype rule
is for trainable parameters, and the DiT keeps its modulation in float32 beside bf16
linears.

The DiT's blocks are sharded one by one, each its own FSDP root, and the small rest
(patch/text/time embeddings, head: under 2% of an A14B expert) is replicated: the
sequence-parallel wrapper calls `embed`/`unembed` directly, which a sharded root would
not have gathered. T5 always runs through its `forward`, so its root (with the 256k-token
embedding, a fifth of the encoder) is sharded too.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard


def fsdp_mesh(device: torch.device, world_size: int) -> DeviceMesh:
    """One mesh dimension over all ranks (call on every rank)."""
    return init_device_mesh(device.type, (world_size,))


def _shard_blocks(model: nn.Module, mesh: DeviceMesh) -> nn.ModuleList:
    model.requires_grad_(False)
    blocks = getattr(model, getattr(model, "repeated_blocks", "blocks"))
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    return blocks


def shard_dit(model: nn.Module, mesh: DeviceMesh, device: torch.device) -> nn.Module:
    """Shard the DiT's blocks over `mesh` (their shards land on `device`) and move the rest
    of the model there whole."""
    blocks = _shard_blocks(model, mesh)
    for child in model.children():
        if child is not blocks:
            child.to(device)
    return model


def shard_t5(encoder: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Shard every encoder block, then the encoder itself (embedding and final norm)."""
    _shard_blocks(encoder, mesh)
    fully_shard(encoder, mesh=mesh, reshard_after_forward=True)
    return encoder
