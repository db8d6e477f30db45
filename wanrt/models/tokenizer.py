"""Prompt cleaning and tokenization for the umt5-xxl encoder (official `HuggingfaceTokenizer`
with `clean='whitespace'`).

transformers and ftfy are imported when first needed so that `import wanrt` stays light.
"""

from __future__ import annotations

import html
import os
import re
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


class PromptTokenizer:
    """Cleans prompts and turns them into `text_len` token ids plus an attention mask."""

    def __init__(self, hf_tokenizer: Any, text_len: int = UMT5_XXL.text_len) -> None:
        self.hf_tokenizer = hf_tokenizer
        self.text_len = text_len

    @classmethod
    def from_folder(cls, path: str | os.PathLike[str],
                    text_len: int = UMT5_XXL.text_len) -> "PromptTokenizer":
        """Load a HuggingFace tokenizer folder (`google/umt5-xxl/` in the official checkpoint,
        `tokenizer/` in the diffusers one). Only local files are read, never the network."""
        folder = os.fspath(path)
        if not os.path.isdir(folder):
            raise CheckpointError(f"tokenizer folder {folder} does not exist")
        from transformers import AutoTokenizer

        try:
            hf_tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as exc:  # the loader raises many types; all mean "unusable folder"
            detail = str(exc).strip().splitlines()
            reason = detail[0] if detail else type(exc).__name__
            raise CheckpointError(f"cannot load a tokenizer from {folder}: {reason}") from exc
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
