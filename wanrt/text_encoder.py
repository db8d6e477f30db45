"""Prompt -> umt5-xxl embeddings, the official `T5EncoderModel.__call__` semantics."""

from __future__ import annotations

import torch
from torch import Tensor

from wanrt.models.t5 import UMT5Encoder
from wanrt.models.tokenizer import PromptTokenizer


class TextEncoder:
    """Tokenizes prompts and runs the encoder wherever its parameters live.

    Each prompt's embedding is trimmed to its valid tokens (`</s>` included): the DiT
    zero-pads it back to its own text_len, which is not the same as keeping the encoder's
    outputs at padding positions.
    """

    def __init__(self, tokenizer: PromptTokenizer, encoder: UMT5Encoder) -> None:
        self.tokenizer = tokenizer
        self.encoder = encoder

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> list[Tensor]:
        """One `[valid_len, dim]` tensor per prompt, in the encoder's device and dtype."""
        ids, mask = self.tokenizer(texts)
        device = self.encoder.token_embedding.weight.device
        ids, mask = ids.to(device), mask.to(device)
        valid_lengths = mask.gt(0).sum(dim=1).tolist()
        hidden = self.encoder(ids, mask)
        return [row[:length] for row, length in zip(hidden, valid_lengths)]
