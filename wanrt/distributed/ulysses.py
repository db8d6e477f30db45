"""Ulysses sequence parallelism for the DiT (DeepSpeed-Ulysses, arXiv 2309.14509), with the
official Wan2.2 layout (`wan/distributed/sequence_parallel.py`).

Each of the N ranks of the group holds the whole model and 1/N of the video tokens. Every
per-token operation (modulation, QKV projections, RoPE, cross-attention, FFN) runs on the
local slice; self-attention, the one operation that mixes tokens, exchanges slices for
heads with an all-to-all, attends over the full sequence with N_heads/N heads, and
exchanges back. The token count is padded up to a multiple of N as the official code does
(`seq_len` rounded up); the padded keys are masked and the padded rows are dropped by
`unembed`, so the result equals the single-process forward.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
from torch import Tensor

from wanrt.models.dit import SelfAttention, WanDiT, attention


def _exchange(chunks: Tensor, group: dist.ProcessGroup) -> Tensor:
    """All-to-all over dim 0 of `[N, ...]`: chunk j goes to rank j, and the result's chunk j
    is what rank j sent here."""
    chunks = chunks.contiguous()  # before empty_like, which would copy a permuted layout
    received = torch.empty_like(chunks)
    dist.all_to_all_single(received, chunks, group=group)
    return received


def sequence_to_heads(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """`[B, L/N, H, D]` (this rank's tokens, every head) -> `[B, L, H/N, D]` (every token,
    this rank's heads: rank r gets heads r*H/N .. (r+1)*H/N, the official split)."""
    size = dist.get_world_size(group)
    batch, local_len, heads, head_dim = x.shape
    chunks = x.reshape(batch, local_len, size, heads // size, head_dim).permute(2, 0, 1, 3, 4)
    received = _exchange(chunks, group)  # [N (whose tokens), B, L/N, H/N, D]
    return received.permute(1, 0, 2, 3, 4).reshape(batch, size * local_len, heads // size, head_dim)


def heads_to_sequence(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """The inverse: `[B, L, H/N, D]` -> `[B, L/N, H, D]`."""
    size = dist.get_world_size(group)
    batch, length, local_heads, head_dim = x.shape
    chunks = x.reshape(batch, size, length // size, local_heads, head_dim).permute(1, 0, 2, 3, 4)
    received = _exchange(chunks, group)  # [N (whose heads), B, L/N, H/N, D]
    return received.permute(1, 2, 0, 3, 4).reshape(batch, length // size, size * local_heads, head_dim)


class UlyssesSelfAttention(SelfAttention):
    """A block's self-attention over a sequence split across `group`; it reuses the
    original projections and norms (same parameters, same state-dict names)."""

    def __init__(self, original: SelfAttention, group: dist.ProcessGroup) -> None:
        torch.nn.Module.__init__(self)
        self.num_heads = original.num_heads
        self.q, self.k, self.v, self.o = original.q, original.k, original.v, original.o
        self.norm_q, self.norm_k = original.norm_q, original.norm_k
        self.group = group

    def forward(self, x: Tensor, rope_cos: Tensor, rope_sin: Tensor, key_mask: Tensor | None) -> Tensor:
        """x, rope tables: this rank's slice of tokens; key_mask: the whole sequence's."""
        q, k, v = self.rotated_qkv(x, rope_cos, rope_sin)
        # `attention` casts q and k to v's dtype anyway; casting first halves the bf16 traffic.
        q, k, v = (sequence_to_heads(t.to(v.dtype), self.group) for t in (q, k, v))
        out = heads_to_sequence(attention(q, k, v, key_mask), self.group)
        return self.o(out.flatten(2))


class SequenceParallelDiT:
    """Runs a `WanDiT` with its tokens split over `group`; the call signature of the model.

    Construction swaps every block's self-attention for `UlyssesSelfAttention`, so from
    then on the model must be called through this wrapper (every rank of the group, with
    the same inputs)."""

    def __init__(self, model: WanDiT, group: dist.ProcessGroup) -> None:
        self.model = model
        self.group = group
        for block in getattr(model, model.repeated_blocks):
            if not isinstance(block.self_attn, UlyssesSelfAttention):
                block.self_attn = UlyssesSelfAttention(block.self_attn, group)

    def __call__(self, x: Tensor, timestep: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
        model, size, rank = self.model, dist.get_world_size(self.group), dist.get_rank(self.group)
        num_tokens = math.prod(n // p for n, p in zip(x.shape[2:], model.config.patch_size))
        seq_len = math.ceil(num_tokens / size) * size
        if timestep.dim() == 2 and timestep.shape[1] < seq_len:
            # Per-token timesteps (ti2v) cover the real tokens; the padded rows get the
            # step's timestep as in the official code (their values reach no real token).
            fill = timestep.amax(dim=1, keepdim=True).expand(-1, seq_len - timestep.shape[1])
            timestep = torch.cat([timestep, fill], dim=1)
        # Embedding the whole input on every rank is cheap next to the blocks, and gives each
        # rank the full key mask and the time embeddings to slice.
        inputs = model.embed(x, timestep, context, y, seq_len=seq_len)
        local = slice(rank * seq_len // size, (rank + 1) * seq_len // size)
        per_token_time = inputs.time_mod.shape[1] > 1
        shard = dataclasses.replace(
            inputs, tokens=inputs.tokens[:, local], rope_cos=inputs.rope_cos[local],
            rope_sin=inputs.rope_sin[local], time_mod=inputs.time_mod[:, local] if per_token_time else inputs.time_mod)
        tokens = shard.tokens
        for block in getattr(model, model.repeated_blocks):
            tokens = model.run_block(block, tokens, shard)
        # The head is per token too: gather its outputs (prod(patch) * out_dim channels, 64
        # for A14B) rather than the blocks' (dim = 5120), 80x less to exchange.
        time_emb = inputs.time_emb[:, local] if inputs.time_emb.shape[1] > 1 else inputs.time_emb
        out = model.head(tokens, time_emb)
        gathered = [torch.empty_like(out) for _ in range(size)]
        dist.all_gather(gathered, out.contiguous(), group=self.group)
        return model.unpatchify(torch.cat(gathered, dim=1), inputs.grid)
