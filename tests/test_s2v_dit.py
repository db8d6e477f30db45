"""S2V DiT parity with the official WanModel_S2V (tests/fixtures/s2v, fp32, CPU).

Tolerance: `assert_parity` (1e-4 relative to max(1, |max|)); the measured errors are about
1e-6 (README: 2 threads 1.4e-6, float64 attention 1.2e-6, bf16 attention 5.3e-3).
"""

from __future__ import annotations

import pytest
import torch

from conftest import FIXTURES, assert_parity, load_fixture
from wanrt.loading.s2v import load_s2v_dit
from wanrt.models.s2v_dit import injector_slots

CKPT = FIXTURES / "s2v" / "Wan2.2-S2V-14B-tiny"


@pytest.fixture(scope="module")
def model():
    return load_s2v_dit(CKPT)


@pytest.fixture(scope="module")
def fixture():
    return load_fixture("s2v/forward")


def _case_inputs(tensors, case):
    audio = tensors["audio_input"]
    if case["audio_input"] != "audio_input":
        audio = torch.zeros_like(audio)
    return dict(x=tensors["x"][None], timestep=tensors["t_scalar"], context=tensors[case["context_key"]][None],
                ref_latents=tensors["ref_latents"][None], motion_latents=tensors[case["motion_latents_key"]][None],
                cond_states=tensors["cond_states"][None], audio=audio,
                motion_frames=tuple(case["motion_frames"]), drop_motion_frames=case["drop_motion_frames"])


@pytest.mark.parametrize("name", ["motion73", "drop_motion", "motion17", "uncond_drop_motion"])
def test_forward_matches_official(model, fixture, name):
    tensors, meta = fixture
    case = next(c for c in meta["cases"] if c["name"] == name)
    with torch.no_grad():
        out = model(**_case_inputs(tensors, case))
    assert_parity(out[0], tensors[case["output_key"]], name)


def test_intermediates_match_official(model, fixture):
    tensors, meta = fixture
    case = next(c for c in meta["cases"] if c["name"] == "motion73")
    expected = {key.removeprefix("motion73.inter."): tensors[key] for key in case["intermediates"]}
    seen: dict[str, list[torch.Tensor]] = {}

    def record(name):
        return lambda _module, _args, output: seen.setdefault(name, []).append(output)

    hooks = [getattr(model, name).register_forward_hook(record(name)) for name in
             ("patch_embedding", "cond_encoder", "frame_packer", "time_embedding", "time_projection",
              "text_embedding", "casual_audio_encoder", "trainable_cond_mask")]
    for slot in range(2):
        hooks.append(model.audio_injector.injector[slot].register_forward_hook(record(f"injector{slot}")))
        hooks.append(model.audio_injector.injector_adain_layers[slot].register_forward_hook(record(f"adain{slot}")))
    hooks.append(model.head.head.register_forward_hook(record("head")))
    with torch.no_grad():
        inputs = model.embed_s2v(**{k: v for k, v in _case_inputs(tensors, case).items()})
        tokens = inputs.tokens
        for index, block in enumerate(model.blocks):
            block_out = block(tokens, inputs.time_mod, inputs.num_x_tokens, inputs.context,
                              inputs.rope_cos, inputs.rope_sin)
            tokens = model.inject_audio(index, block_out, inputs)
            assert_parity(block_out, expected[f"block{index}_out"], f"block{index}_out")
            assert_parity(tokens, expected[f"block{index}_after_audio"], f"block{index}_after_audio")
        model.unembed_s2v(tokens, inputs)
    for hook in hooks:
        hook.remove()

    checks = {
        "patch_embedding_x": seen["patch_embedding"][0], "patch_embedding_ref": seen["patch_embedding"][1],
        "cond_encoder": seen["cond_encoder"][0], "frame_packer.tokens": seen["frame_packer"][0],
        "audio_encoder.global": seen["casual_audio_encoder"][0][0],
        "audio_encoder.local": seen["casual_audio_encoder"][0][1],
        "merged_audio_emb": inputs.audio_tokens, "audio_emb_global": inputs.audio_global,
        "cond_mask_emb": seen["trainable_cond_mask"][0][None],
        "time_embedding_e": seen["time_embedding"][0][:, 0], "time_projection_e0": seen["time_projection"][0][:, 0],
        "text_embedding": seen["text_embedding"][0], "head_out": seen["head"][0],
        "rope_freqs_real": inputs.rope_cos[None, :, 0], "rope_freqs_imag": inputs.rope_sin[None, :, 0],
        **{f"audio_adain{s}_out": seen[f"adain{s}"][0] for s in range(2)},
        **{f"audio_injector{s}_out": seen[f"injector{s}"][0] for s in range(2)},
    }
    for name, actual in checks.items():
        assert_parity(actual, expected[name], name)
    kinds = torch.tensor([0] * 96 + [1] * 32 + [2] * 48)
    assert torch.equal(kinds[None], expected["mask_input"])
    assert set(checks) | {"mask_input"} | {f"block{i}_{s}" for i in range(3) for s in ("out", "after_audio")} \
        == set(expected)


def test_injector_slots_follow_official_substring_match():
    released = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
    assert injector_slots(released, 40) == ({layer: i for i, layer in enumerate(released)}, 12)
    # "transformer_blocks.1" is a substring of blocks 1 and 10..12: the last match wins
    # the dict entry while every match takes an injector, as in the official code.
    assert injector_slots((1,), 13) == ({1: 3}, 4)
