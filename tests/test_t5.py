"""umt5 text encoder: parity with the official golden fixtures, the tokenizer and its
cleaning, prompt encoding, and the transformers/diffusers checkpoint layout."""

from __future__ import annotations

import dataclasses
import html
import json
import re
from pathlib import Path

import pytest
import torch
from diffusers_layout import transformers_umt5
from safetensors.torch import load_file

from wanrt.configs import TINY_T5, UMT5_XXL
from wanrt.demo import EOS_ID, PAD_ID, write_toy_tokenizer
from wanrt.errors import CheckpointError
from wanrt.loading.diffusers_t5 import (
    config_from_transformers,
    to_diffusers,
    to_official,
)
from wanrt.models.t5 import UMT5Encoder
from wanrt.models.tokenizer import PromptTokenizer, clean_prompt
from wanrt.text_encoder import TextEncoder

FIXTURES = Path(__file__).parent / "fixtures" / "t5"


def relative_tolerance(reference: torch.Tensor, scale: float) -> float:
    """`scale * max(1, max|reference|)`: absolute for small outputs, relative for large."""
    return scale * max(1.0, reference.abs().max().item())


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "t5.safetensors")


@pytest.fixture(scope="module")
def tiny_state_dict() -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / "umt5_tiny_enc.pth", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def tiny_encoder(tiny_state_dict) -> UMT5Encoder:
    encoder = UMT5Encoder(TINY_T5)
    encoder.load_state_dict(tiny_state_dict, strict=True)
    return encoder.eval()


@pytest.fixture(scope="module")
def toy_tokenizer_folder(tmp_path_factory) -> Path:
    """The demo's toy tokenizer, saved where the official checkpoint keeps its own."""
    pytest.importorskip("transformers")
    return write_toy_tokenizer(tmp_path_factory.mktemp("checkpoint") / "google" / "umt5-xxl")


@pytest.fixture(scope="module")
def prompt_tokenizer(toy_tokenizer_folder) -> PromptTokenizer:
    return PromptTokenizer.from_folder(toy_tokenizer_folder, text_len=TINY_T5.text_len)


# --- encoder ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["short", "long"])
def test_matches_official_fixture_on_valid_rows(tiny_encoder, golden, case):
    ids, mask, reference = golden[f"{case}.ids"], golden[f"{case}.mask"], golden[f"{case}.out"]
    with torch.no_grad():
        out = tiny_encoder(ids, mask)
    valid = mask.bool()
    # Float32 rounding alone; the fixture README measures the float64 gap at <= 1e-6.
    error = (out[valid] - reference[valid]).abs().max().item()
    assert error <= relative_tolerance(reference[valid], 1e-4), f"{case}: max abs {error:.3g}"


def test_valid_rows_do_not_depend_on_padding(tiny_encoder, golden):
    ids, mask = golden["short.ids"][:1], golden["short.mask"][:1]
    valid_len = int(mask.sum())
    with torch.no_grad():
        unpadded = tiny_encoder(ids[:, :valid_len], mask[:, :valid_len])
        # Longer padding whose ids are not even the pad id: only the mask may matter.
        padded_ids = torch.cat([ids[:, :valid_len], torch.full((1, 40), 7)], dim=1)
        padded_mask = torch.cat([mask[:, :valid_len], torch.zeros(1, 40, dtype=mask.dtype)], dim=1)
        padded = tiny_encoder(padded_ids, padded_mask)[:, :valid_len]
    error = (padded - unpadded).abs().max().item()
    assert error <= relative_tolerance(unpadded, 1e-5), f"max abs {error:.3g}"


def test_full_size_builds_on_meta_with_official_keys(tiny_state_dict):
    with torch.device("meta"):
        encoder = UMT5Encoder(UMT5_XXL)
    shapes = {key: tuple(p.shape) for key, p in encoder.state_dict().items()}

    def block_agnostic(keys):
        return {re.sub(r"^blocks\.\d+\.", "blocks.*.", key) for key in keys}

    assert block_agnostic(shapes) == block_agnostic(tiny_state_dict)
    assert {int(key.split(".")[1]) for key in shapes if key.startswith("blocks.")} == set(range(24))
    assert shapes["token_embedding.weight"] == (256384, 4096)
    assert shapes["blocks.0.attn.q.weight"] == (4096, 4096)
    assert shapes["blocks.23.ffn.gate.0.weight"] == (10240, 4096)
    assert shapes["blocks.23.ffn.fc1.weight"] == (10240, 4096)
    assert shapes["blocks.23.ffn.fc2.weight"] == (4096, 10240)
    assert shapes["blocks.5.pos_embedding.embedding.weight"] == (32, 64)
    assert shapes["norm.weight"] == (4096,)


def test_shared_position_bias_is_one_table():
    config = dataclasses.replace(TINY_T5, shared_pos=True)
    encoder = UMT5Encoder(config)
    bias_keys = [key for key in encoder.state_dict() if "pos_embedding" in key]
    assert bias_keys == ["pos_embedding.embedding.weight"]
    ids = torch.randint(2, config.vocab_size, (1, 5))
    with torch.no_grad():
        assert encoder(ids, torch.ones_like(ids)).shape == (1, 5, config.dim)


# --- tokenizer -------------------------------------------------------------------------


def test_pads_to_text_len_with_mask(prompt_tokenizer):
    ids, mask = prompt_tokenizer(["cat dog on", "dog and"])
    assert ids.dtype == mask.dtype == torch.int64
    assert ids.shape == mask.shape == (2, TINY_T5.text_len)
    words = prompt_tokenizer.hf_tokenizer.convert_tokens_to_ids(["\u2581cat", "\u2581dog", "\u2581on"])
    assert ids[0, :4].tolist() == [*words, EOS_ID]
    assert ids[0, 4:].eq(PAD_ID).all() and mask[0].tolist() == [1] * 4 + [0] * 12
    assert mask[1].sum() == 3


def test_truncates_long_prompt_keeping_end_token(prompt_tokenizer):
    ids, mask = prompt_tokenizer(["dog " * 40])
    assert ids[0, -1] == EOS_ID and ids[0, :-1].eq(ids[0, 0]).all()
    assert mask.eq(1).all()


def test_cleaning_follows_the_official_rules(prompt_tokenizer):
    ftfy = pytest.importorskip("ftfy")
    assert clean_prompt("  a  &amp;amp;   b\n") == "a & b"
    assert clean_prompt("a，b") == ftfy.fix_text("a，b") != "a，b"
    # The tokenizer sees the cleaned text, not the raw prompt.
    ids, _ = prompt_tokenizer(["a  &amp;amp;\t b", "a，b"])
    expected = prompt_tokenizer.hf_tokenizer(
        ["a & b", ftfy.fix_text("a，b")], padding="max_length", max_length=TINY_T5.text_len,
        return_tensors="pt")
    assert torch.equal(ids, expected.input_ids)


def test_whitespace_is_unicode_white_space_like_the_official_regex():
    ftfy = pytest.importorskip("ftfy")
    regex = pytest.importorskip("regex")

    def official(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return regex.sub(r"\s+", " ", text).strip()

    # Everything either flavour of `\s` matches, U+001C..U+001F included.
    candidates = [chr(c) for c in range(0x3001) if chr(c).isspace() or regex.match(r"\s", chr(c))]
    for char in candidates:
        text = f"x{char}{char}y {char}"
        assert clean_prompt(text) == official(text), f"U+{ord(char):04X}"


def test_missing_or_unusable_folder_raises_checkpoint_error(tmp_path):
    missing = tmp_path / "google" / "umt5-xxl"
    with pytest.raises(CheckpointError, match=re.escape(str(missing))):
        PromptTokenizer.from_folder(missing)
    empty = tmp_path / "tokenizer"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=re.escape(str(empty))) as caught:
        PromptTokenizer.from_folder(empty)
    assert "\n" not in str(caught.value)


# --- prompt encoding -------------------------------------------------------------------


def test_text_encoder_returns_valid_rows(prompt_tokenizer, tiny_encoder):
    prompts = ["cat dog on", "dog " * 40]
    embeddings = TextEncoder(prompt_tokenizer, tiny_encoder)(prompts)
    ids, mask = prompt_tokenizer(prompts)
    with torch.no_grad():
        full = tiny_encoder(ids, mask)
    assert [e.shape for e in embeddings] == [(4, TINY_T5.dim), (TINY_T5.text_len, TINY_T5.dim)]
    for row, embedding in enumerate(embeddings):
        assert torch.equal(embedding, full[row, : len(embedding)])


# --- transformers / diffusers layout ---------------------------------------------------


@pytest.fixture(scope="module")
def transformers_encoder(tmp_path_factory):
    """A random tiny transformers UMT5EncoderModel at TINY_T5's shape, saved to disk."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers_umt5(transformers, TINY_T5).eval()
    with torch.no_grad():
        # Distinct norm gains, so that swapping two norms in the key map would show.
        for name, parameter in model.named_parameters():
            if "layer_norm" in name:
                parameter.add_(0.3 * torch.randn_like(parameter))
    folder = tmp_path_factory.mktemp("text_encoder")
    model.save_pretrained(folder)
    return model, folder


def test_transformers_checkpoint_matches_transformers_model(transformers_encoder, golden):
    model, folder = transformers_encoder
    encoder = UMT5Encoder(TINY_T5)
    encoder.load_state_dict(to_official(load_file(folder / "model.safetensors")), strict=True)
    for case in ("short", "long"):
        ids, mask = golden[f"{case}.ids"], golden[f"{case}.mask"]
        with torch.no_grad():
            reference = model(input_ids=ids, attention_mask=mask).last_hidden_state
            out = encoder.eval()(ids, mask)
        valid = mask.bool()
        # Same float32 math in a different op order (transformers adds the mask instead of
        # filling it): rounding-level differences only.
        error = (out[valid] - reference[valid]).abs().max().item()
        assert error <= relative_tolerance(reference[valid], 1e-5), f"{case}: max abs {error:.3g}"


def test_key_map_round_trips_exactly(transformers_encoder):
    _, folder = transformers_encoder
    saved = load_file(folder / "model.safetensors")
    round_trip = to_diffusers(to_official(saved))
    stored = {k: v for k, v in saved.items() if k != "encoder.embed_tokens.weight"}
    assert round_trip.keys() == stored.keys()
    assert all(torch.equal(round_trip[k], stored[k]) for k in stored)
    # A checkpoint that stores only the tied alias of the embedding still maps.
    alias_only = {k: v for k, v in stored.items() if k != "shared.weight"}
    alias_only["encoder.embed_tokens.weight"] = stored["shared.weight"]
    assert to_official(alias_only).keys() == to_official(saved).keys()


def test_config_from_transformers(transformers_encoder):
    _, folder = transformers_encoder
    raw = json.loads((folder / "config.json").read_text())
    # text_len is a pipeline setting, absent from config.json: the caller passes it.
    assert config_from_transformers(raw, text_len=TINY_T5.text_len) == TINY_T5
    assert config_from_transformers(raw) == dataclasses.replace(TINY_T5, text_len=UMT5_XXL.text_len)
    for bad in ({"model_type": "t5"}, {"feed_forward_proj": "relu"},
                {"relative_attention_max_distance": 64}):
        with pytest.raises(CheckpointError, match=next(iter(bad))):
            config_from_transformers({**raw, **bad})


def test_unknown_keys_raise_checkpoint_error(tiny_state_dict):
    diffusers_layout = to_diffusers(tiny_state_dict)
    stray = torch.zeros(1)
    decoder_key = "decoder.block.0.layer.0.SelfAttention.q.weight"
    with pytest.raises(CheckpointError, match=re.escape(decoder_key)):
        to_official({**diffusers_layout, decoder_key: stray})
    with pytest.raises(CheckpointError, match=re.escape("blocks.0.attn.bias")):
        to_diffusers({**tiny_state_dict, "blocks.0.attn.bias": stray})
