"""Prompt cleaning and tokenization for the umt5-xxl encoder (official `HuggingfaceTokenizer`
with `clean='whitespace'`).

transformers and ftfy are imported when first needed so that `import wanrt` stays light.
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path
from typing import Any

from torch import Tensor

from wanrt.configs import UMT5_XXL
from wanrt.errors import CheckpointError

# The official code collapses whitespace with the third-party `regex` module, whose `\s` is
# the Unicode White_Space property. The stdlib `\s` also matches U+001C..U+001F, so the
# property is spelled out here to keep the exact behaviour without that dependency.
_WHITESPACE_RUN = re.compile(
    "[\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


def clean_prompt(text: str) -> str:
    """Official prompt cleaning: ftfy repair (which also turns full-width punctuation into
    ASCII), HTML unescaped twice, then whitespace runs collapsed to one space."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE_RUN.sub(" ", text).strip()


# What the released folders hold and `AutoTokenizer` reads. Without tokenizer.json,
# transformers quietly builds a 4-token tokenizer from the config alone, and every prompt
# becomes <unk>: a video from an ignored prompt.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# A tokenizer with fewer tokens than this fraction of the encoder's embedding rows is not
# the encoder's (umt5-xxl: 256300 tokens, 256384 rows; the tiny test model 66 of 256).
_MIN_VOCAB_FRACTION = 1 / 8


def check_tokenizer_files(folder: str | os.PathLike[str]) -> None:
    """Refuse a tokenizer folder missing a file it needs."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"tokenizer folder {folder} does not exist; check --ckpt-dir")
    missing = [name for name in TOKENIZER_FILES if not (Path(folder) / name).is_file()]
    if missing:
        raise CheckpointError(f"tokenizer folder {folder} lacks {', '.join(missing)}; download the "
                              "checkpoint's tokenizer files again")


def check_vocab_size(tokens: int, embedding_rows: int, folder: str) -> None:
    if tokens > embedding_rows or tokens < embedding_rows * _MIN_VOCAB_FRACTION:
        raise CheckpointError(f"tokenizer {folder} has {tokens} tokens but the text encoder embeds "
                              f"{embedding_rows}: it is not this encoder's tokenizer; download the "
                              "checkpoint's own tokenizer folder")


class PromptTokenizer:
    """Cleans prompts and turns them into `text_len` token ids plus an attention mask."""

    def __init__(self, hf_tokenizer: Any, text_len: int = UMT5_XXL.text_len) -> None:
        self.hf_tokenizer = hf_tokenizer
        self.text_len = text_len

    @classmethod
    def from_folder(cls, path: str | os.PathLike[str], text_len: int = UMT5_XXL.text_len,
                    vocab_size: int | None = None) -> "PromptTokenizer":
        """Load a HuggingFace tokenizer folder (`google/umt5-xxl/` in the official checkpoint,
        `tokenizer/` in the diffusers one). Only local files are read, never the network.
        `vocab_size` is the rows of the encoder's token embedding, which it must fit."""
        folder = os.fspath(path)
        check_tokenizer_files(folder)
        from transformers import AutoTokenizer

        try:
            hf_tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as exc:  # the loader raises many types; all mean "unusable folder"
            detail = str(exc).strip().splitlines()
            reason = detail[0] if detail else type(exc).__name__
            raise CheckpointError(f"cannot load a tokenizer from {folder}: {reason}") from exc
        if vocab_size is not None:
            check_vocab_size(len(hf_tokenizer), vocab_size, folder)
        return cls(hf_tokenizer, text_len)

    def __call__(self, texts: list[str] | str) -> tuple[Tensor, Tensor]:
        """Token ids and mask, both int64 `[B, text_len]`.

        As in the official call, the end token `</s>` is appended, long prompts are cut so
        that `</s>` stays last, and short ones are right-padded with the pad id and mask 0.
        """
        if isinstance(texts, str):
            texts = [texts]
        encoded = self.hf_tokenizer(
            [clean_prompt(text) for text in texts],
            padding="max_length", truncation=True, max_length=self.text_len,
            add_special_tokens=True, return_tensors="pt")
        return encoded.input_ids, encoded.attention_mask
