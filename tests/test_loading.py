"""Checkpoint loading: both layouts load to the same model; bad files fail with clear errors."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, assert_parity, load_fixture
from diffusers_layout import diffusers_transformer, write_diffusers_checkpoint
from safetensors.torch import load_file, save_file

from wanrt.configs import get_task
from wanrt.errors import CheckpointError
from wanrt.loading import diffusers_dit
from wanrt.loading.checkpoint import (
    Expert,
    Layout,
    check_dit_matches_vae,
    load_dit,
    locate_checkpoint,
)
from wanrt.loading.files import load_pth
from wanrt.loading.save import save_dit_official, save_pth
from wanrt.models.dit import WanDiT
from wanrt.random_weights import randomize_

T2V_HIGH = FIXTURES / "dit/t2v/high_noise_model"


def _random_inputs(config, frames=2, height=8, width=8):
    """Noise latents (out_dim channels: i2v adds its 20 conditioning channels as y)."""
    x = torch.randn(1, config.out_dim, frames, height, width)
    context = torch.randn(1, 5, config.text_dim)
    return x, torch.tensor([937]), context


def _official_state(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    return state


def test_key_map_is_a_bijection_over_every_official_key():
    with torch.device("meta"):
        model = WanDiT(get_task("tiny-t2v").dit)
    official = list(model.state_dict())
    mapped = [diffusers_dit.diffusers_key(k) for k in official]
    assert len(set(mapped)) == len(official)
    assert [diffusers_dit.official_key(k) for k in mapped] == official


def test_diffusers_layout_written_by_diffusers_loads_to_the_same_model(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    official = load_dit(T2V_HIGH)
    cfg = official.config
    reference = diffusers_transformer(diffusers, cfg)
    # Strict load into diffusers' own module proves the map covers its names exactly.
    reference.load_state_dict(diffusers_dit.to_diffusers(_official_state(T2V_HIGH)), strict=True)
    reference.save_pretrained(tmp_path / "transformer", max_shard_size="1MB")
    assert (tmp_path / "transformer/diffusion_pytorch_model.safetensors.index.json").is_file()

    ours = load_dit(tmp_path / "transformer", expect=dataclasses.replace(cfg))
    assert ours.config == cfg
    for key, tensor in official.state_dict().items():
        assert torch.equal(ours.state_dict()[key], tensor), key

    tensors, _ = load_fixture("dit/forward_t2v")
    x, context, t = tensors["g1.x"][None], tensors["context"][None], tensors["t_scalar"]
    with torch.no_grad():
        out = ours(x, t, context)
        theirs = reference(x, t, torch.nn.functional.pad(context, (0, 0, 0, cfg.text_len - 7)),
                           return_dict=False)[0]
    assert_parity(out[0], tensors["g1.t2v.high_noise_model.scalar_t.out"], "diffusers-layout load")
    # diffusers computes the timestep sinusoid in float32 (DIFFUSERS.md: ~5e-6).
    assert_parity(out, theirs, "vs diffusers forward", rtol=1e-5)


def test_official_writer_round_trips_and_matches_released_config_fields(tmp_path):
    config = get_task("tiny-i2v").dit
    with torch.device("meta"):
        model = WanDiT(config)
    randomize_(model, seed=3)
    save_dit_official(model, tmp_path / "high_noise_model", max_shard_bytes=200_000)
    raw = json.loads((tmp_path / "high_noise_model/config.json").read_text())
    assert "text_dim" not in raw and raw["in_dim"] == 36 and raw["model_type"] == "i2v"
    assert len(list((tmp_path / "high_noise_model").glob("*.safetensors"))) > 1
    loaded = load_dit(tmp_path / "high_noise_model", expect=config)
    assert loaded.config == config  # text_dim 32 recovered from the weights' shapes
    x, t, context = _random_inputs(config)
    y = torch.randn(1, 20, 2, 8, 8)
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    with torch.no_grad():
        # Bit-identical weights; the outputs may still differ in the last float32 bit
        # because kernels pick paths by memory alignment (mmap-loaded vs allocated).
        assert_parity(loaded(x, t, context, y=y), model(x, t, context, y=y), "reload", rtol=1e-6)


def test_load_casts_to_bf16_but_keeps_time_and_modulation_float32():
    model = load_dit(T2V_HIGH, dtype=torch.bfloat16)
    assert model.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert model.blocks[0].modulation.dtype == torch.float32
    assert model.time_embedding[0].weight.dtype == torch.float32
    assert model.head.head.weight.dtype == torch.float32


def test_bf16_autocast_forward_stays_close_to_float32():
    """The float32 islands keep a bf16 run within bf16 noise (fixture README: ~4e-3)."""
    tensors, _ = load_fixture("dit/forward_t2v")
    model = load_dit(T2V_HIGH, dtype=torch.bfloat16)
    x, context, t = tensors["g1.x"][None], tensors["context"][None], tensors["t_scalar"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, context)
    assert out.dtype == torch.float32
    assert_parity(out[0], tensors["g1.t2v.high_noise_model.scalar_t.out"], "bf16", rtol=2e-2)


# ----------------------------------------------------------------------------- bad inputs


@pytest.fixture
def t2v_copy(tmp_path):
    folder = tmp_path / "high_noise_model"
    shutil.copytree(T2V_HIGH, folder)
    return folder


def test_truncated_shard_is_reported_as_truncated(t2v_copy):
    shard = t2v_copy / "diffusion_pytorch_model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"00002-of-00002\.safetensors: truncated"):
        load_dit(t2v_copy)


def test_git_lfs_pointer_is_reported_with_the_fix(t2v_copy):
    shard = t2v_copy / "diffusion_pytorch_model-00001-of-00002.safetensors"
    shard.write_text("version https://git-lfs.github.com/spec/v1\n"
                     "oid sha256:0123\nsize 1048704\n")
    with pytest.raises(CheckpointError, match=r"00001-of-00002\.safetensors: this is a git-lfs pointer.*git lfs pull"):
        load_dit(t2v_copy)


def test_missing_shard_named(t2v_copy):
    (t2v_copy / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"00002-of-00002\.safetensors: shard listed in .*index\.json not found"):
        load_dit(t2v_copy)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    state = _official_state(T2V_HIGH)
    del state["blocks.1.ffn.2.bias"]
    state["blocks.1.extra.weight"] = torch.zeros(2)
    folder = tmp_path / "model"
    folder.mkdir()
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    shutil.copy(T2V_HIGH / "config.json", folder)
    with pytest.raises(CheckpointError) as info:
        load_dit(folder)
    message = str(info.value)
    assert str(folder) in message
    assert "missing keys: blocks.1.ffn.2.bias" in message
    assert "unexpected keys: blocks.1.extra.weight" in message


def test_wrong_shape_is_refused(tmp_path):
    state = _official_state(T2V_HIGH)
    state["blocks.0.ffn.0.weight"] = torch.zeros(64, 64)
    folder = tmp_path / "model"
    folder.mkdir()
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    shutil.copy(T2V_HIGH / "config.json", folder)
    with pytest.raises(CheckpointError, match=r"wrong shapes: blocks\.0\.ffn\.0\.weight \(64, 64\) != \(128, 64\)"):
        load_dit(folder)


def test_t2v_expert_refused_for_an_i2v_task():
    expect = dataclasses.replace(get_task("tiny-i2v").dit, text_dim=4096)
    with pytest.raises(CheckpointError, match=r"this t2v DiT does not fit the task: model_type t2v \(needs i2v\), in_dim 16 \(needs 36\)"):
        load_dit(T2V_HIGH, expect=expect)


def test_16_channel_dit_refused_with_48_channel_vae():
    with pytest.raises(CheckpointError, match="predicts 16 latent channels but the Wan2.2 VAE has 48"):
        check_dit_matches_vae(get_task("tiny-t2v").dit, get_task("tiny-ti2v").vae, "ckpt")


def test_unknown_config_key_refused(t2v_copy):
    raw = json.loads((t2v_copy / "config.json").read_text())
    raw["num_experts"] = 2
    (t2v_copy / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"config\.json: unknown DiT config keys \['num_experts'\]"):
        load_dit(t2v_copy)


class _WritesMarker:
    """A pickle payload that would create a file if it were ever unpickled with full pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _WritesMarker(marker)}, path)
    with pytest.raises(CheckpointError, match=r"Wan2\.1_VAE\.pth: refused to load: the file contains pickled objects"):
        load_pth(path)
    assert not marker.exists()


def test_truncated_pth_reported(tmp_path):
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    save_pth({"w": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(CheckpointError, match="truncated or corrupt checkpoint"):
        load_pth(path)


def test_locate_both_layouts(tmp_path):
    (tmp_path / "diffusers").mkdir()
    (tmp_path / "diffusers/model_index.json").write_text("{}")
    files = locate_checkpoint(tmp_path / "diffusers", get_task("t2v-A14B"))
    assert files.layout is Layout.DIFFUSERS
    assert files.dit_dirs[Expert.HIGH_NOISE].name == "transformer"
    assert files.dit_dirs[Expert.LOW_NOISE].name == "transformer_2"
    official = locate_checkpoint(tmp_path, get_task("ti2v-5B"))
    assert official.layout is Layout.OFFICIAL
    assert official.dit_dirs == {Expert.ONLY: tmp_path}
    assert official.vae.name == "Wan2.2_VAE.pth"
    assert official.tokenizer == tmp_path / "google/umt5-xxl"
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        locate_checkpoint(tmp_path / "nope", get_task("t2v-A14B"))


@pytest.mark.parametrize("task_name", ["tiny-t2v", "tiny-ti2v"])
def test_whole_checkpoint_in_both_layouts_generates_the_same_video(tmp_path, task_name):
    """Every component (DiTs, VAE, T5, tokenizer) through the production loaders."""
    pytest.importorskip("diffusers")
    from wanrt.demo import write_tiny_checkpoint
    from wanrt.pipelines import GenerationRequest, Pipeline

    task = get_task(task_name)
    official = write_tiny_checkpoint(tmp_path / "official", task, seed=4)
    diffusers_root = write_diffusers_checkpoint(official, task, tmp_path / "diffusers")
    request = GenerationRequest(prompt="a cat on the beach", steps=3, seed=8)
    videos = []
    for root in (official, diffusers_root):
        pipeline = Pipeline.from_pretrained(root, task_name)
        assert pipeline.files.layout is (Layout.OFFICIAL if root == official else Layout.DIFFUSERS)
        latents = pipeline.sample(request)
        videos.append((latents, pipeline.decode(latents)))
    (lat_a, video_a), (lat_b, video_b) = videos
    assert_parity(lat_b, lat_a, "latents across layouts", rtol=1e-5)
    assert_parity(video_b, video_a, "video across layouts", rtol=1e-5)
