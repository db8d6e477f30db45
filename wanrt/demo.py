"""Tiny random-weight checkpoints in the exact official on-disk layout.

They exercise every real code path (loading, T5, MoE sampling, VAE, video writing) in
seconds on a CPU. The weights are random: the video is noise-like, never a real result.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from wanrt.audio import AudioTrack
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


def _write_tiny_s2v_models(root: Path, task: TaskSpec, seed: int) -> None:
    """The S2V DiT at `root` and a random wav2vec2 in its official sub-folder, shaped like
    wav2vec2-large-xlsr-53 (24 layers, stable layer norm, 7 convs) at `audio_dim` width."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    from wanrt.loading.s2v import save_s2v_dit_official
    from wanrt.models.s2v_dit import WanS2VDiT

    with torch.device("meta"):
        dit = WanS2VDiT(task.dit, task.s2v)
    save_s2v_dit_official(randomize_(dit, seed), root, max_shard_bytes=256 * 1024)
    width = task.s2v.audio_dim
    config = Wav2Vec2Config(
        hidden_size=width, num_hidden_layers=24, num_attention_heads=2, intermediate_size=2 * width,
        conv_dim=(width,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, do_stable_layer_norm=True,
        feat_extract_norm="layer", vocab_size=32)
    torch.manual_seed(seed)
    folder = root / task.extras["wav2vec"]
    Wav2Vec2ForCTC(config).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(folder)


def speech_like_audio(seconds: float, rate: int = 16000, seed: int = 0) -> AudioTrack:
    """A voiced, syllable-like test signal: a gliding 110-220 Hz pitch with its first
    harmonics under a ~4 Hz syllable envelope, plus a little breath noise."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * rate), dtype=torch.float64) / rate
    pitch = 165 + 55 * torch.sin(2 * math.pi * 0.7 * t)
    phase = 2 * math.pi * torch.cumsum(pitch, dim=0) / rate
    voiced = sum(torch.sin(k * phase) / k for k in range(1, 6))
    envelope = torch.sin(math.pi * 4 * t).abs() ** 0.5
    noise = 0.02 * torch.randn(t.shape, generator=generator, dtype=torch.float64)
    return AudioTrack((0.3 * envelope * voiced + noise).float()[None], rate)


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
            if task.s2v is not None:
                _write_tiny_s2v_models(staging, task, seed + offset)
                continue
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

