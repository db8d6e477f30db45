"""CLIP image features (`clip_fea`) parity with the official `CLIPModel.visual`."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURES, assert_parity, load_fixture

from wanrt.errors import CheckpointError
from wanrt.loading.checkpoint import load_clip_vision

CLIP_PTH = FIXTURES / "animate/Wan2.2-Animate-14B-tiny/models_clip_open-clip-xlm-roberta-large-vit-huge-14_tiny.pth"


def test_clip_features_match_official():
    tensors, _ = load_fixture("animate/forward")
    heads = json.loads((FIXTURES / "animate/clip.json").read_text())["config"]["vision_heads"]
    model = load_clip_vision(CLIP_PTH, num_heads=heads)
    # The fixture's 3 blocks: 2 run (use_31_block), 257 tokens from 32 px / 2 px patches.
    assert (model.config.num_layers, model.config.num_tokens, model.config.dim) == (2, 257, 32)
    with torch.no_grad():
        features = model.encode(tensors["clip_ref_pixels"][None])
    assert_parity(features, tensors["clip_fea"], "clip_fea")


def test_clip_checkpoint_without_visual_tower_is_refused(tmp_path):
    path = tmp_path / "clip.pth"
    torch.save({"log_scale": torch.ones(())}, path)
    with pytest.raises(CheckpointError, match="no visual tower"):
        load_clip_vision(path, num_heads=2)
