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
from typing import Callable

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
    def write(staging: Path) -> None:
        files = locate_checkpoint(staging, task)
        for offset, (expert, folder) in enumerate(files.dit_dirs.items()):
            if task.s2v is not None:
                _write_tiny_s2v_models(staging, task, seed + offset)
                continue
            with torch.device("meta"):
                dit = WanDiT(task.dit)
            # Shards of ~256 KB so the tiny model is sharded with an index, as released.
            save_dit_official(randomize_(dit, seed + offset), folder, max_shard_bytes=256 * 1024)
        _write_vae_and_text_encoder(staging, task, seed)
    return _write_staged(Path(root), write)


def _write_staged(root: Path, write: Callable[[Path], None]) -> Path:
    """`write(folder)` into a temporary sibling of `root`, then rename it into place."""
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        write(staging)
        if root.exists():
            shutil.rmtree(root)
        os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root


def _write_vae_and_text_encoder(folder: Path, task: TaskSpec, seed: int) -> None:
    from wanrt.models.t5 import UMT5Encoder
    from wanrt.models.vae import WanVAE

    files = locate_checkpoint(folder, task)
    save_pth(_random_state(WanVAE, task.vae, seed + 10), files.vae)
    t5_state = _random_state(UMT5Encoder, task.t5, seed + 20)
    # The released encoder is stored in bf16.
    save_pth({k: v.to(torch.bfloat16) for k, v in t5_state.items()}, files.t5)
    write_toy_tokenizer(files.tokenizer)


# Tiny Animate sub-networks: 32 px faces (3 ResBlocks), a 64-row motion basis, the official
# 4 face-encoder streams. The CLIP tower keeps 16x16 patches: the DiT slices 257 image rows.
TINY_ANIMATE_WIDTHS = dict(clip_dim=32, lia_channels=(4, 8, 16, 32), style_dim=32, motion_dim=20,
                           motion_vector_dim=64, face_encoder_dim=16, face_encoder_heads=4)
TINY_CLIP = dict(image_size=32, patch_size=2, dim=32, mlp_ratio=4, num_layers=2)
TINY_RELIGHTING_RANK = 4


def write_tiny_animate_checkpoint(root: Path, task: TaskSpec, seed: int = 0) -> Path:
    """A complete official-layout Wan2.2-Animate folder for a tiny task: the DiT
    (`WanAnimateModel` config.json + shards), the CLIP `.pth` (its image tower; the text
    tower is not read), the relighting LoRA (`{'state_dict': PEFT keys}`), VAE, T5 and
    tokenizer. Written in a temporary sibling folder and renamed into place."""
    from wanrt.loading.save import official_dit_config, save_safetensors_sharded, write_json
    from wanrt.models.animate_dit import AnimateDiT, AnimateWidths, Blur
    from wanrt.models.clip import ClipVision, ClipVisionConfig

    def write(staging: Path) -> None:
        widths = AnimateWidths(**TINY_ANIMATE_WIDTHS)
        with torch.device("meta"):
            dit = AnimateDiT(task.dit, widths)
        randomize_(dit, seed)
        for module in dit.modules():
            if isinstance(module, Blur):  # a buffer: randomize_ fills parameters only
                module.reset_kernel()
        save_safetensors_sharded(dit.state_dict(), staging, "diffusion_pytorch_model", 256 * 1024)
        config = {key: value for key, value in official_dit_config(task.dit).items() if key != "model_type"}
        write_json(staging / "config.json", {
            **config, "_class_name": "WanAnimateModel", "motion_encoder_dim": widths.motion_vector_dim,
            "use_context_parallel": False, "use_img_emb": True, "window_size": [-1, -1]})
        clip_config = ClipVisionConfig(num_heads=task.extras["clip_heads"], **TINY_CLIP)
        clip = _random_state(ClipVision, clip_config, seed + 30)
        clip_state = {f"visual.{key}": value for key, value in clip.items()}
        clip_state.update({"visual.post_norm.weight": torch.ones(clip_config.dim),
                           "visual.post_norm.bias": torch.zeros(clip_config.dim),
                           "visual.head": torch.randn(clip_config.dim, 16), "log_scale": torch.tensor(2.6593)})
        save_pth(clip_state, staging / task.extras["clip_checkpoint"])
        save_pth({"state_dict": _random_relighting_lora(dit, seed + 40)}, staging / task.extras["lora_checkpoint"])
        _write_vae_and_text_encoder(staging, task, seed)
    return _write_staged(Path(root), write)


def _random_relighting_lora(dit: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """PEFT keys for every Linear inside `blocks`, bf16, as the released relighting LoRA."""
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for name, module in dit.blocks.named_modules():
        if isinstance(module, torch.nn.Linear):
            out_features, in_features = module.weight.shape
            lora[f"blocks.{name}.lora_A.weight"] = torch.randn(TINY_RELIGHTING_RANK, in_features, generator=generator)
            lora[f"blocks.{name}.lora_B.weight"] = 0.01 * torch.randn(out_features, TINY_RELIGHTING_RANK,
                                                                     generator=generator)
    return {key: value.to(torch.bfloat16) for key, value in lora.items()}

def write_toy_animate_source(folder: Path, task: TaskSpec, frames: int = 13, replace: bool = True,
                             size: str | None = None) -> Path:
    """A `src_root_path` folder in the official preprocessor's layout for the tiny task: a
    moving square as the pose video, its face crops, a gradient reference image, and for
    replacement a background video and the square as the person mask."""
    from wanrt.models.animate_dit import AnimateWidths
    from wanrt.video_io import write_image, write_video

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    width, height = (int(v) for v in (size or task.sample.sizes[0]).split("*"))
    face = AnimateWidths(**TINY_ANIMATE_WIDTHS).face_size
    time = torch.linspace(0, 1, frames)[:, None, None]
    ys, xs = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    person = ((xs - 0.25 - 0.5 * time).abs() < 0.15) & ((ys - 0.5).abs() < 0.3)          # [T, H, W]
    pose = torch.where(person, 1.0, -1.0)[None].expand(3, -1, -1, -1)
    write_video(pose, folder / "src_pose.mp4", fps=task.sample.fps)
    face_frames = torch.linspace(-1, 1, face)[None, None, :].expand(3, frames, face, face) * (time[None] * 2 - 1)
    write_video(face_frames.contiguous(), folder / "src_face.mp4", fps=task.sample.fps)
    write_image(torch.stack([xs * 2 - 1, ys * 2 - 1, torch.zeros_like(xs)]), folder / "src_ref.png")
    if replace:
        background = torch.stack([ys * 2 - 1, torch.zeros_like(xs), xs * 2 - 1])[:, None].expand(-1, frames, -1, -1)
        write_video(background.contiguous(), folder / "src_bg.mp4", fps=task.sample.fps)
        write_video(torch.where(person, 1.0, -1.0)[None].expand(3, -1, -1, -1).contiguous(),
                    folder / "src_mask.mp4", fps=task.sample.fps)
    return folder
