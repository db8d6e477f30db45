"""AOTInductor packages on the CPU: `wanrt export --backend aoti` of a tiny MoE checkpoint
(built once per module: compiling C++ takes a while on two cores), each package against the
eager graph at both ends of its dynamic profile, `generate --engine aoti` against eager,
streaming through the block package, and refusals (tampered, stale, out of profile)."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import assert_parity
from PIL import Image
from typer.testing import CliRunner
from wanrt.cli.app import app

from wanrt.configs import get_task
from wanrt.engines.base import use_engine
from wanrt.export.aoti import PACKAGE_FILE, build_package, load_package
from wanrt.export.build import Backend, artifact_identity
from wanrt.export.manifest import MANIFEST_FILE, ArtifactStore
from wanrt.export.quantize import PrecisionPolicy, quantize
from wanrt.export.specs import VAE_STEPS, Component, block_tensor_names, export_module, make_spec
from wanrt.generate import read_latents
from wanrt.loading.checkpoint import Expert
from wanrt.models.dit import WanDiT
from wanrt.models.vae import WanVAE
from wanrt.pipelines import GenerationRequest, Pipeline, StreamingConfig, TextEmbeddings
from wanrt.random_weights import randomize_

pytestmark = pytest.mark.slow
runner = CliRunner()
TASK = get_task("tiny-t2v")
CPU = torch.device("cpu")
SIZES, FRAME_NUMS = "64*64,96*64", "9,5"


def wanrt(*args: object):
    return runner.invoke(app, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    """`wanrt export` of pre, block, post and the VAE decoder step over 64*64..96*64, 5..9 frames."""
    out = tmp_path_factory.mktemp("exported")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANRT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        result = wanrt("export", "--task", TASK.name, "--ckpt-dir", checkpoints[TASK.name], "--backend", "aoti",
                       "--sizes", SIZES, "--frame-nums", FRAME_NUMS, "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    return out, result.stdout


@pytest.fixture(scope="module")
def models(checkpoints):
    pipeline = Pipeline.from_pretrained(checkpoints[TASK.name], TASK.name, device="cpu")
    return {expert: pipeline.dit(expert) for expert in (Expert.HIGH_NOISE, Expert.LOW_NOISE)}, pipeline.vae


def test_export_writes_one_block_package_for_both_experts(exported):
    out, stdout = exported
    lines = stdout.strip().splitlines()
    assert len([line for line in lines if line.startswith("dit_block")]) == 1
    assert "[blocks high_noise 0-1, low_noise 0-1]" in stdout
    assert len([line for line in lines if line.startswith("dit_pre")]) == 2
    assert len([line for line in lines if line.startswith("dit_post")]) == 2
    assert len([line for line in lines if line.startswith("vae_decoder_step")]) == 1
    assert len([line for line in lines if line.startswith("vae_decoder_first_step")]) == 1
    for manifest_path in out.glob(f"*/{MANIFEST_FILE}"):
        manifest = json.loads(manifest_path.read_text())
        assert manifest["identity"]["backend"] == "aoti" and manifest["identity"]["device_arch"] == "cpu"
        assert manifest["identity"]["torch_version"] == torch.__version__
        assert manifest["dynamic"] is True and list(manifest["files"]) == [PACKAGE_FILE]


def _cases(models):
    experts, vae = models
    yield Component.DIT_BLOCK, experts[Expert.HIGH_NOISE].blocks[1]
    yield Component.DIT_BLOCK, experts[Expert.LOW_NOISE].blocks[0]
    for expert in experts.values():
        yield Component.DIT_PRE, expert
        yield Component.DIT_POST, expert
    yield Component.VAE_DECODER_STEP, vae
    yield Component.VAE_DECODER_FIRST_STEP, vae


def _package_errors(package, component, model, spec, seed: int) -> list[float]:
    """Max abs difference of every output of `package` against the eager export graph, at
    the min and max shapes of the spec's profile (a block gets its own weights)."""
    graph, errors = export_module(component, model), []
    for which in ("min", "max"):
        inputs = list(spec.example_inputs(which=which, seed=seed))
        if component is Component.DIT_BLOCK:  # the block's own weights, not random ones
            block = model.blocks[0] if isinstance(model, WanDiT) else model
            state = block.state_dict(keep_vars=True)
            inputs[5:] = [state[name] for name in block_tensor_names(block)]
        with torch.no_grad():
            expected = graph(*inputs)
        for name, want, have in zip(spec.output_names(), expected, package(*inputs), strict=True):
            errors.append(assert_parity(have, want, f"{component.value} {which} {name}"))
    return errors


def test_each_package_matches_eager_at_both_ends_of_its_profile(exported, models):
    out, _ = exported
    store = ArtifactStore(out, build=False)
    errors = {}
    for component, model in _cases(models):
        identity = artifact_identity(component, Backend.AOTI, model, CPU, "bf16")
        directory, manifest = store.find(identity)
        package = load_package(directory, CPU)
        spec = make_spec(component, model, TASK, SIZES.split(","), [9, 5])
        assert manifest.profiles == spec.profiles
        error = max(_package_errors(package, component, model, spec, seed=7))
        errors[component.value] = max(errors.get(component.value, 0.0), error)
    # Measured on torch 2.13 CPU (float32): block 2.9e-6, pre 2.4e-7, post 1.2e-6, VAE
    # decoder step 1.3e-5 (its feature cache; the frames 2.6e-6).
    print("max abs diff per component:", {k: f"{v:.2g}" for k, v in errors.items()})


def test_generate_with_aoti_equals_eager(exported, checkpoints, tmp_path, cache_dir):
    out, _ = exported
    common = ("generate", "--task", TASK.name, "--ckpt-dir", checkpoints[TASK.name], "--prompt", "a red fox",
              "--size", "96*64", "--frame-num", 9, "--steps", 3, "--seed", 3)
    eager = wanrt(*common, "--output", tmp_path / "eager.mp4")
    compiled = wanrt(*common, "--engine", "aoti", "--engine-dir", out, "--output", tmp_path / "aoti.mp4")
    assert eager.exit_code == 0, eager.output
    assert compiled.exit_code == 0, compiled.output
    assert "engine: aoti (aoti " in compiled.stderr
    latents = {name: read_latents(tmp_path / f"{name}.latents.safetensors")[0] for name in ("eager", "aoti")}
    # The latents agree to float32 rounding (measured: 3.8e-6 of ~6). The mp4s are not
    # compared: a lossy codec turns 1e-6 differences of a noise video into different codes;
    # the VAE step package is compared before encoding in the streaming test below.
    error = assert_parity(latents["aoti"], latents["eager"], "latents")
    print(f"generate --engine aoti vs eager: latents max abs diff {error:.2g}")
    sidecar = json.loads((tmp_path / "aoti.json").read_text())
    assert sidecar["options"]["engine"].startswith("aoti")


def test_auto_picks_the_exported_packages_and_says_so(exported, checkpoints, tmp_path, cache_dir):
    out, _ = exported
    result = wanrt("generate", "--task", TASK.name, "--ckpt-dir", checkpoints[TASK.name], "--prompt", "a fox",
                   "--size", "64*64", "--frame-num", 5, "--steps", 2, "--engine", "auto", "--engine-dir", out,
                   "--output", tmp_path / "auto.mp4")
    assert result.exit_code == 0, result.output
    assert "engine: aoti" in result.stderr and "auto: AOTInductor packages found in" in result.stderr


def test_streamed_blocks_run_through_the_package(exported, checkpoints):
    out, _ = exported
    embeddings = TextEmbeddings(torch.randn(7, TASK.dit.text_dim), torch.randn(11, TASK.dit.text_dim))
    request = GenerationRequest("streamed", size="64*64", frame_num=9, steps=3, seed=5)
    eager = Pipeline.from_pretrained(checkpoints[TASK.name], TASK.name, device="cpu")
    expected = eager.sample(request, embeddings)
    expected_video = eager.decode(expected)
    streamed = Pipeline.from_pretrained(checkpoints[TASK.name], TASK.name, device="cpu")
    streamed.streaming = StreamingConfig(resident_blocks=0, depth=1)
    use_engine(streamed, "aoti", out)
    latents = streamed.sample(request, embeddings)
    assert streamed.streamed_bytes > 0, "the blocks' weights went through the streamer's slots"
    error = assert_parity(latents, expected, "streamed aoti latents")
    video_error = assert_parity(streamed.decode(latents), expected_video, "aoti VAE decode")
    print(f"streaming + aoti vs eager: latents {error:.2g}, video {video_error:.2g}")


@pytest.mark.parametrize("damage", ["one changed byte", "another torch version"])
def test_a_damaged_package_is_refused_before_it_is_loaded(exported, checkpoints, tmp_path, cache_dir,
                                                           monkeypatch, damage):
    out, _ = exported
    damaged = tmp_path / "engines"
    shutil.copytree(out, damaged)
    block_dir = next(damaged.glob("dit_block-*"))
    if damage == "one changed byte":
        package = block_dir / PACKAGE_FILE
        data = bytearray(package.read_bytes())
        data[len(data) // 2] ^= 0x01
        package.write_bytes(bytes(data))
        message = "does not match its manifest"
    else:
        raw = json.loads((block_dir / MANIFEST_FILE).read_text())
        raw["identity"]["torch_version"] = "2.0.0"
        (block_dir / MANIFEST_FILE).write_text(json.dumps(raw))
        message = "built for another setup: torch_version '2.0.0'"
    loaded = []
    real_load = torch._inductor.aoti_load_package
    monkeypatch.setattr(torch._inductor, "aoti_load_package",
                        lambda path, *args, **kwargs: loaded.append(path) or real_load(path, *args, **kwargs))
    result = wanrt("generate", "--task", TASK.name, "--ckpt-dir", checkpoints[TASK.name], "--prompt", "x",
                   "--size", "64*64", "--frame-num", 5, "--steps", 1, "--engine", "aoti", "--engine-dir", damaged,
                   "--output", tmp_path / "refused.mp4")
    assert result.exit_code == 2, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last and "Traceback" not in result.output
    assert loaded and not any(str(block_dir) in str(path) for path in loaded), "the damaged package was never loaded"
    assert not (tmp_path / "refused.mp4").exists()


def test_a_run_outside_the_exported_profile_is_refused(exported, checkpoints, tmp_path, cache_dir):
    out, _ = exported
    result = wanrt("generate", "--task", TASK.name, "--ckpt-dir", checkpoints[TASK.name], "--prompt", "x",
                   "--size", "64*64", "--frame-num", 13, "--steps", 1, "--engine", "aoti", "--engine-dir", out,
                   "--output", tmp_path / "outside.mp4")
    assert result.exit_code == 2, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert "has no aoti dit_pre artifact" in last and "wanrt export --backend aoti" in last


def test_an_fp8_block_package_matches_the_eager_quantized_block(models, tmp_path):
    experts, _ = models
    model = quantize(copy.deepcopy(experts[Expert.HIGH_NOISE]), "fp8",
                     PrecisionPolicy(keep_first_blocks=0, keep_last_blocks=0))
    block = model.blocks[0]
    spec = make_spec(Component.DIT_BLOCK, block, TASK, ["64*64"], [9])
    built = build_package(spec, block, tmp_path, CPU)
    assert built.dynamic is False  # one run's shape: a static package
    inputs = list(spec.example_inputs(seed=3))
    state = block.state_dict(keep_vars=True)
    inputs[5:] = [state[name] for name in block_tensor_names(block)]
    assert inputs[5 + block_tensor_names(block).index("ffn.0.weight")].dtype == torch.float8_e4m3fn
    with torch.no_grad():
        expected = block(*inputs[:5])
    got = load_package(tmp_path, CPU)(*inputs)[0]
    error = assert_parity(got, expected, "fp8 block")
    print(f"fp8 block package vs eager (dequantized weights): max abs diff {error:.2g}")



@pytest.mark.parametrize("component, per_token", [(Component.VAE_ENCODER_FIRST_STEP, False)])
def test_ti2v_image_packages_match_eager_at_both_ends_of_their_profile(component, per_token, tmp_path):
    """What ti2v with an image adds: the one-frame encode of the image, over its whole profile.
    (The DiT graphs with per-token timesteps are checked end to end by the test below.)"""
    task = get_task("tiny-ti2v")
    model = randomize_(WanVAE(task.vae) if component in VAE_STEPS else WanDiT(task.dit), seed=5).eval()
    spec = make_spec(component, model, task, ["128*64", "128*128"], [5, 9], per_token_timesteps=per_token)
    built = build_package(spec, model, tmp_path, CPU)
    assert built.dynamic
    errors = _package_errors(load_package(tmp_path, CPU), component, model, spec, seed=9)
    print(f"ti2v {component.value}{' per-token' if per_token else ''} package vs eager: "
          f"max abs diff {max(errors):.2g}")


def test_ti2v_with_an_image_through_aoti_equals_eager(checkpoints, tmp_path, cache_dir):
    """End to end, real packages built on first use: the image's one-frame encode, the DiT
    with per-token timesteps, and the decoder's first and steady steps."""
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)).save(image)
    common = ("generate", "--task", "tiny-ti2v", "--ckpt-dir", checkpoints["tiny-ti2v"], "--prompt", "a red fox",
              "--image", image, "--size", "128*64", "--frame-num", 5, "--steps", 2, "--seed", 3)
    eager = wanrt(*common, "--output", tmp_path / "eager.mp4")
    compiled = wanrt(*common, "--engine", "aoti", "--output", tmp_path / "aoti.mp4")
    assert eager.exit_code == 0, eager.output
    assert compiled.exit_code == 0, compiled.output
    built = sorted(p.name.rsplit("-", 2)[0] for p in (cache_dir / "engines").iterdir() if not p.name.startswith("."))
    assert built == ["dit_block", "dit_post", "dit_pre", "vae_decoder_first_step", "vae_decoder_step",
                     "vae_encoder_first_step"]
    latents = {name: read_latents(tmp_path / f"{name}.latents.safetensors")[0] for name in ("eager", "aoti")}
    # Measured on torch 2.13 CPU: 7.6e-6, float32 rounding.
    error = assert_parity(latents["aoti"], latents["eager"], "ti2v latents")
    print(f"ti2v --image --engine aoti vs eager: latents max abs diff {error:.2g}")
