"""DiT parity with the official WanModel (fixtures made by the official code, float32)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURES, assert_parity, load_fixture

from wanrt.configs import get_task
from wanrt.loading.checkpoint import load_dit
from wanrt.models.dit import WanDiT, apply_rope, rope_tables, sinusoidal_embedding

VARIANTS = ("t2v", "i2v", "ti2v")


def _cases():
    for variant in VARIANTS:
        meta = json.loads((FIXTURES / f"dit/forward_{variant}.json").read_text())
        for case in meta["cases"]:
            yield pytest.param(variant, case, id=case["output_key"])


def test_sinusoid_matches_official_float64():
    tensors, _ = load_fixture("dit/micro")
    for kind in ("int64", "float32"):
        ours = sinusoidal_embedding(32, tensors[f"sinusoid.t_{kind}"])
        assert ours.dtype == torch.float64
        # Same float64 formula: only last-bit differences are allowed.
        assert (ours - tensors[f"sinusoid.out_{kind}"]).abs().max() < 1e-12


def test_rope_tables_match_official_complex_freqs():
    tensors, _ = load_fixture("dit/micro")
    real, imag = tensors["rope.freqs_real"], tensors["rope.freqs_imag"]  # [16 positions, 4F+2H+2W]
    axis_columns = {0: slice(0, 4), 1: slice(4, 6), 2: slice(6, 8)}
    for axis, columns in axis_columns.items():
        grid = [1, 1, 1]
        grid[axis] = 16
        cos, sin = rope_tables(tuple(grid), head_dim=16, seq_len=16)
        # rope_tables concatenates F, H, W angles; positions vary only along `axis`.
        assert torch.allclose(cos[:, 0, columns].double(), real[:, columns], atol=1e-7)
        assert torch.allclose(sin[:, 0, columns].double(), imag[:, columns], atol=1e-7)


def test_rope_apply_matches_official_with_padding_rows():
    tensors, _ = load_fixture("dit/micro")
    grid = tuple(tensors["rope.grid_FHW"][0].tolist())
    q = tensors["rope.q_in"]
    cos, sin = rope_tables(grid, head_dim=16, seq_len=q.shape[1])
    out = apply_rope(q, cos, sin)
    # float32 rotation of float64-exact angles vs the official complex128 product.
    assert_parity(out, tensors["rope.out"], "rope", rtol=1e-6)
    assert torch.equal(out[:, 12:], q[:, 12:]), "padding rows must pass through unrotated"


_INTERMEDIATE_MODULES = {
    "patch_embedding": "patch_embedding",
    "time_embedding_e": "time_embedding",
    "time_projection_e0": "time_projection",
    "text_embedding": "text_embedding",
    "block0_out": "blocks.0",
    "block1_out": "blocks.1",
    "head_out": "head",
}


@pytest.fixture(scope="module")
def fixture_tensors():
    return {variant: load_fixture(f"dit/forward_{variant}")[0] for variant in VARIANTS}


@pytest.fixture(scope="module")
def loaded_models():
    cache: dict[str, WanDiT] = {}

    def get(folder: str) -> WanDiT:
        if folder not in cache:
            cache[folder] = load_dit(FIXTURES / folder)
        return cache[folder]
    return get


@pytest.mark.parametrize("variant,case", list(_cases()))
def test_forward_matches_official(variant, case, fixture_tensors, loaded_models):
    tensors = fixture_tensors[variant]
    model = loaded_models(case["model_folder"])
    captured = {}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda _m, _i, out, key=key: captured.__setitem__(key, out))
        for key, name in _INTERMEDIATE_MODULES.items()]
    x = tensors[case["x_key"]][None]
    y = tensors[case["y_key"]][None] if case["y_key"] else None
    t = tensors[case["t_key"]]
    with torch.no_grad():
        out = model(x, t, tensors[case["context_key"]][None], y=y, seq_len=case["seq_len"])
    for hook in hooks:
        hook.remove()
    assert_parity(out[0], tensors[case["output_key"]], case["output_key"])
    prefix = case["output_key"].removesuffix(".out")
    for inter_key in case["intermediates"]:
        name = inter_key.rsplit(".", 1)[1]
        expected = tensors[inter_key]
        ours = captured[name]
        # A [B] timestep is embedded once and broadcast; the official code repeats it per token.
        ours = ours.expand_as(expected) if name.startswith("time_") else ours
        assert inter_key.startswith(prefix)
        assert_parity(ours, expected, inter_key)


def test_fixture_checkpoints_have_the_tiny_preset_architecture():
    """text_dim is absent from config.json (4096 by default), the rest matches the presets."""
    model = load_dit(FIXTURES / "dit/t2v/high_noise_model", expect=None)
    assert model.config.text_dim == 4096
    tiny = get_task("tiny-t2v").dit
    for name in ("dim", "ffn_dim", "num_heads", "num_layers", "freq_dim", "text_len", "in_dim", "out_dim"):
        assert getattr(model.config, name) == getattr(tiny, name)


def test_full_size_a14b_builds_on_meta_with_expected_parameter_count():
    with torch.device("meta"):
        model = WanDiT(get_task("t2v-A14B").dit)
    params = sum(p.numel() for p in model.parameters())
    # Per block: 4 self-attn + 4 cross-attn dim^2 projections with biases, 2 FFN matrices,
    # qk-norm weights (2 per attention), norm3 affine, modulation (6*dim).
    dim, ffn, layers = 5120, 13824, 40
    attention = 4 * (dim * dim + dim) + 2 * dim
    block = 2 * attention + (dim * ffn + ffn) + (ffn * dim + dim) + 2 * dim + 6 * dim
    embed = (16 * 4 * dim + dim) + (4096 * dim + dim + dim * dim + dim) \
        + (256 * dim + dim + dim * dim + dim) + (dim * 6 * dim + 6 * dim)
    head = dim * 64 + 64 + 2 * dim
    assert params == layers * block + embed + head
    assert 14.2e9 < params < 14.4e9  # "A14B": each expert is ~14B parameters
