"""Tiny random-weight checkpoints in the exact official on-disk layout.

They exercise every real code path (loading, T5, MoE sampling, VAE, video writing) in
seconds on a CPU. The weights are random: the video is noise-like, never a real result.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from wanrt.configs import TaskSpec
from wanrt.loading.checkpoint import locate_checkpoint
from wanrt.loading.save import save_dit_official, save_pth
from wanrt.models.dit import WanDiT
from wanrt.random_weights import randomize_

# A sentencepiece-style vocabulary: whole words, then single characters, so any prompt
# tokenizes (unknown characters map to <unk>).
_SPECIAL_PIECES = ("<pad>", "</s>", "<unk>")
_WORDS = ("a", "the", "cat", "dog", "on", "in", "with", "and", "of", "video", "surfing", "beach",
          "sunset", "city", "night", "walking", "red", "blue", "car", "street")
_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-"
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


def write_toy_tokenizer(folder: Path) -> Path:
    """A small Unigram + Metaspace tokenizer saved like the official `google/umt5-xxl/`
    folder (pad 0, `</s>` 1 appended to every prompt, unk 2)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = [*_SPECIAL_PIECES, *("\u2581" + w for w in _WORDS), "\u2581", *_CHARACTERS]
    # Special tokens score 0; the rest get decreasing log-probabilities, whole words first.
    vocab = [(piece, 0.0 if index < len(_SPECIAL_PIECES) else -float(index))
             for index, piece in enumerate(pieces)]
    backend = Tokenizer(models.Unigram(vocab, unk_id=UNK_ID))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", EOS_ID)])
    tokenizer = transformers.T5TokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0)
    tokenizer.save_pretrained(folder)
    return folder


def _random_state(model_cls, config, seed: int) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = model_cls(config)
    return randomize_(model, seed).state_dict()


def write_tiny_checkpoint(root: Path, task: TaskSpec, seed: int = 0) -> Path:
    """Write a complete official-layout checkpoint for a tiny task at `root`.

    Built in a temporary sibling folder and renamed into place, so an interrupted write
    never leaves a half checkpoint that a later run would trust.
    """
    from wanrt.models.t5 import UMT5Encoder
    from wanrt.models.vae import WanVAE

    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        files = locate_checkpoint(staging, task)
        for offset, (expert, folder) in enumerate(files.dit_dirs.items()):
            with torch.device("meta"):
                dit = WanDiT(task.dit)
            # Shards of ~256 KB so the tiny model is sharded with an index, as released.
            save_dit_official(randomize_(dit, seed + offset), folder, max_shard_bytes=256 * 1024)
        save_pth(_random_state(WanVAE, task.vae, seed + 10), files.vae)
        t5_state = _random_state(UMT5Encoder, task.t5, seed + 20)
        # The released encoder is stored in bf16.
        save_pth({k: v.to(torch.bfloat16) for k, v in t5_state.items()}, files.t5)
        write_toy_tokenizer(files.tokenizer)
        if root.exists():
            shutil.rmtree(root)
        os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root

