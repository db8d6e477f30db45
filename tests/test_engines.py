"""The runner interface: engine selection (`auto` says what it picked), one-line refusals,
the compile engine against eager, and the artifact engine's orchestration (what is built,
shared, reused or run eagerly) with a backend whose 'artifacts' are the eager graphs, so no
compilation runs here (tests/test_aoti.py runs real packages)."""

from __future__ import annotations

import importlib.util
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import assert_parity
from PIL import Image
from test_cli import assert_one_line_error, wanrt

from wanrt.cli.export import default_components, timestep_variants
from wanrt.configs import get_task
from wanrt.engines.aoti_runner import AOTIEngine
from wanrt.engines.base import ENGINES, EngineKind, EngineOptions, make_engine, use_engine
from wanrt.engines.compiled import CompiledEngine
from wanrt.export.build import BUILDERS, Backend, weights_digest
from wanrt.export.manifest import BuiltFiles
from wanrt.export.specs import export_module
from wanrt.generate import read_latents
from wanrt.loading.checkpoint import Expert
from wanrt.models.dit import WanDiT
from wanrt.models.vae import WanVAE
from wanrt.pipelines import GenerationRequest, Pipeline, TextEmbeddings
from wanrt.random_weights import randomize_

T2V = get_task("tiny-t2v")
TENSORRT_INSTALLED = importlib.util.find_spec("tensorrt") is not None


def _embeddings(text_dim: int) -> TextEmbeddings:
    generator = torch.Generator().manual_seed(11)
    return TextEmbeddings(torch.randn(6, text_dim, generator=generator), torch.randn(9, text_dim, generator=generator))


def _pipeline(task=T2V) -> Pipeline:
    experts = ({Expert.HIGH_NOISE: 1, Expert.LOW_NOISE: 2} if task.is_moe else {Expert.ONLY: 1})
    models = {expert: randomize_(WanDiT(task.dit), seed=seed).eval() for expert, seed in experts.items()}
    return Pipeline.from_models(task, models, vae=randomize_(WanVAE(task.vae), seed=3).eval())


def _generate(pipeline: Pipeline, request: GenerationRequest) -> tuple[torch.Tensor, torch.Tensor]:
    latents = pipeline.sample(request, _embeddings(pipeline.task.dit.text_dim))
    return latents, pipeline.decode(latents)


REQUEST = GenerationRequest("unused", size="96*64", frame_num=9, steps=3, seed=4)


# ---------------------------------------------------------------------------- selection


@pytest.mark.skipif(TENSORRT_INSTALLED, reason="TensorRT is installed here: nothing to refuse")
def test_tensorrt_without_tensorrt_is_one_line_and_exit_2(checkpoints, tmp_path, cache_dir):
    result = wanrt("generate", "--task", "tiny-t2v", "--ckpt-dir", checkpoints["tiny-t2v"], "--prompt", "x",
                   "--engine", "tensorrt", "--output", tmp_path / "out.mp4")
    assert_one_line_error(result, "TensorRT is not installed", "pip install 'wanrt[tensorrt]'")
    result = wanrt("export", "--task", "tiny-t2v", "--ckpt-dir", checkpoints["tiny-t2v"], "--backend", "tensorrt",
                   "--out", tmp_path / "engines")
    assert_one_line_error(result, "TensorRT is not installed")
    assert not (tmp_path / "out.mp4").exists() and not (tmp_path / "engines").exists()


def test_auto_without_built_engines_on_the_cpu_is_eager_and_says_why(checkpoints, tmp_path, cache_dir):
    result = wanrt("generate", "--task", "tiny-t2v", "--ckpt-dir", checkpoints["tiny-t2v"], "--prompt", "x",
                   "--frame-num", 5, "--steps", 1, "--engine", "auto", "--output", tmp_path / "out.mp4")
    assert result.exit_code == 0, result.output
    assert "engine: eager (auto: no built engine in" in result.stderr
    assert "and no GPU for torch.compile" in result.stderr


@pytest.mark.parametrize("engine, folder, needle", [
    ("eager", "exists", "--engine-dir is read by --engine aoti, tensorrt or auto"),
    ("aoti", "missing", "is not a folder; write it with `wanrt export --out"),
    ("turbo", "exists", "'turbo' is not one of"),
])
def test_bad_engine_options_are_one_line_errors(checkpoints, tmp_path, cache_dir, engine, folder, needle):
    engine_dir = tmp_path / "engines"
    if folder == "exists":
        engine_dir.mkdir()
    result = wanrt("generate", "--task", "tiny-t2v", "--ckpt-dir", checkpoints["tiny-t2v"], "--prompt", "x",
                   "--engine", engine, "--engine-dir", engine_dir, "--output", tmp_path / "out.mp4")
    assert_one_line_error(result, needle)


def test_every_engine_kind_is_registered():
    assert set(ENGINES) == set(EngineKind) - {EngineKind.AUTO}
    options = EngineOptions(T2V, torch.device("cpu"))
    assert isinstance(make_engine("compile", options), CompiledEngine)
    assert isinstance(make_engine("aoti", options), AOTIEngine)


# ---------------------------------------------------------------------------- compile


def test_the_compile_engine_equals_eager():
    eager_latents, eager_video = _generate(_pipeline(), REQUEST)
    compiled = _pipeline()
    engine = use_engine(compiled, "compile")
    latents, _ = _generate(compiled, REQUEST)
    assert engine.describe() == "compile"
    assert all(hasattr(block.forward, "_torchdynamo_orig_callable")
               for model in compiled._experts.values() for block in model.blocks)
    error = assert_parity(latents, eager_latents, "compiled latents")
    assert torch.equal(compiled.decode(eager_latents), eager_video), "the compile engine leaves the VAE alone"
    print(f"torch.compile of the block vs eager: latents max abs diff {error:.2g}")


# ---------------------------------------------------------------------------- artifacts


class EagerGraphEngine(AOTIEngine):
    """The aoti engine with 'packages' that are the eager export graphs: the orchestration
    runs for real (store, manifests, lookup, reuse), without compiling."""

    built: Counter = Counter()
    loaded: Counter = Counter()
    per_token: set = set()  # components built in their per-token-timestep variant
    models: dict = {}

    def load(self, directory, manifest, spec):
        EagerGraphEngine.loaded[spec.component.value] += 1
        graph = export_module(spec.component, EagerGraphEngine.models[manifest.identity.weights_sha256])
        return lambda *inputs: graph(*inputs)


def _eager_graph_builder(spec, model, out_dir, device, scheme, root) -> BuiltFiles:
    EagerGraphEngine.built[spec.component.value] += 1
    time_inputs = [t for t in spec.inputs if t.name in ("time_sinusoid", "time_mod", "time_emb")]
    if any("tokens" in t.shape for t in time_inputs):
        EagerGraphEngine.per_token.add(spec.component.value)
    EagerGraphEngine.models[weights_digest(spec.component, model)] = model
    (out_dir / "graph.txt").write_text(spec.component.value)
    return BuiltFiles(("graph.txt",), dynamic=False)


@pytest.fixture
def eager_graph_backend(monkeypatch, cache_dir):
    monkeypatch.setitem(BUILDERS, Backend.AOTI, _eager_graph_builder)
    monkeypatch.setitem(ENGINES, EngineKind.AOTI, f"{__name__}:EagerGraphEngine")
    EagerGraphEngine.built, EagerGraphEngine.loaded, EagerGraphEngine.per_token = Counter(), Counter(), set()
    return cache_dir / "engines"


def test_the_cache_builds_each_artifact_once_and_shares_the_block_across_experts(eager_graph_backend):
    expected = _generate(_pipeline(), REQUEST)
    first = _pipeline()
    use_engine(first, "aoti")
    got = _generate(first, REQUEST)
    # Both experts' blocks share one artifact; pre and post bake weights, so one per expert.
    assert EagerGraphEngine.built == {"dit_pre": 2, "dit_post": 2, "dit_block": 1, "vae_decoder_first_step": 1,
                                      "vae_decoder_step": 1}
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert sorted(p.name.split("-")[0] for p in eager_graph_backend.iterdir() if not p.name.startswith(".")) == [
        "dit_block", "dit_post", "dit_post", "dit_pre", "dit_pre", "vae_decoder_first_step", "vae_decoder_step"]
    # A new process (new pipeline, new engine) finds and verifies them: nothing is rebuilt.
    second = _pipeline()
    use_engine(second, "aoti")
    _generate(second, REQUEST)
    assert sum(EagerGraphEngine.built.values()) == 7 and sum(EagerGraphEngine.loaded.values()) == 14
    assert not EagerGraphEngine.per_token


def test_auto_runs_what_an_exported_folder_lacks_eagerly(eager_graph_backend, tmp_path):
    expected = _generate(_pipeline(), REQUEST)
    # A folder holding only the block artifact (e.g. `wanrt export --components dit_block`).
    use_engine(only_blocks := _pipeline(), "aoti")
    _generate(only_blocks, REQUEST)
    for path in eager_graph_backend.iterdir():
        if path.name.split("-")[0] in ("dit_pre", "dit_post", "vae_decoder_first_step", "vae_decoder_step"):
            shutil.rmtree(path)
    pipeline = _pipeline()
    engine = use_engine(pipeline, "auto", eager_graph_backend)
    got = _generate(pipeline, REQUEST)
    assert engine.kind is EngineKind.AOTI and "auto: AOTInductor packages found" in engine.describe()
    assert engine.eager_components == {"dit_pre", "dit_post", "vae_decoder_first_step", "vae_decoder_step"}
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def _assert_aoti_equals_eager(task, request: GenerationRequest) -> None:
    """Latents and video through the aoti engine are those of the eager pipeline, exactly."""
    expected = _generate(_pipeline(task), request)
    pipeline = _pipeline(task)
    use_engine(pipeline, "aoti")
    got = _generate(pipeline, request)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_per_token_timesteps_run_the_per_token_graphs(eager_graph_backend):
    """ti2v with an image gives every token its own timestep: pre, blocks and post run their
    per-token variants, and the image's encode (one frame) the first encoder step."""
    image = torch.rand(3, 64, 128) * 2 - 1
    _assert_aoti_equals_eager(get_task("tiny-ti2v"),
                              GenerationRequest("unused", size="128*64", frame_num=5, steps=2, seed=1, image=image))
    assert EagerGraphEngine.built == {"dit_pre": 1, "dit_block": 1, "dit_post": 1, "vae_encoder_first_step": 1,
                                      "vae_decoder_first_step": 1, "vae_decoder_step": 1}
    assert EagerGraphEngine.per_token == {"dit_pre", "dit_block", "dit_post"}


def test_i2v_runs_its_conditioning_through_pre_and_the_encoder_step(eager_graph_backend):
    image = torch.rand(3, 64, 64) * 2 - 1
    _assert_aoti_equals_eager(get_task("tiny-i2v"),
                              GenerationRequest("unused", size="64*64", frame_num=9, steps=2, seed=2, image=image))
    assert EagerGraphEngine.built == {"dit_pre": 2, "dit_post": 2, "dit_block": 1, "vae_decoder_first_step": 1,
                                      "vae_decoder_step": 1, "vae_encoder_first_step": 1, "vae_encoder": 1}


def test_ti2v_export_serves_generate_with_an_image(eager_graph_backend, checkpoints, tmp_path, cache_dir):
    """`wanrt export` of ti2v builds both timestep variants and the one-frame image encode by
    default, so `generate --image --engine-dir` finds every graph it runs."""
    out, image = tmp_path / "engines", tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)).save(image)
    result = wanrt("export", "--task", "tiny-ti2v", "--ckpt-dir", checkpoints["tiny-ti2v"], "--device", "cpu",
                   "--backend", "aoti", "--sizes", "128*64", "--frame-nums", 5, "--out", out)
    assert result.exit_code == 0, result.output
    assert EagerGraphEngine.built == {"dit_pre": 2, "dit_block": 2, "dit_post": 2, "vae_decoder_first_step": 1,
                                      "vae_decoder_step": 1, "vae_encoder_first_step": 1}
    assert EagerGraphEngine.per_token == {"dit_pre", "dit_block", "dit_post"}
    assert "dit_block [blocks only 0-1, per-token timesteps]" in result.stdout
    common = ("generate", "--task", "tiny-ti2v", "--ckpt-dir", checkpoints["tiny-ti2v"], "--prompt", "a red fox",
              "--image", image, "--size", "128*64", "--frame-num", 5, "--steps", 2, "--seed", 3)
    eager = wanrt(*common, "--output", tmp_path / "eager.mp4")
    engine = wanrt(*common, "--engine", "aoti", "--engine-dir", out, "--output", tmp_path / "engine.mp4")
    assert eager.exit_code == 0 and engine.exit_code == 0, engine.output
    assert sum(EagerGraphEngine.built.values()) == 9, "the exported folder is read, never built into"
    latents = {name: read_latents(tmp_path / f"{name}.latents.safetensors")[0] for name in ("eager", "engine")}
    assert torch.equal(latents["engine"], latents["eager"])


@pytest.mark.parametrize("task_name, encoder_steps", [
    ("t2v-A14B", []),
    ("i2v-A14B", ["vae_encoder_first_step", "vae_encoder"]),  # the image and its zero frames
    ("ti2v-5B", ["vae_encoder_first_step"]),                  # --image: one frame
])
def test_export_defaults_to_what_the_tasks_generation_runs(task_name, encoder_steps):
    task = get_task(task_name)
    assert [c.value for c in default_components(task)] == [
        "dit_pre", "dit_block", "dit_post", "vae_decoder_first_step", "vae_decoder_step", *encoder_steps]
    assert timestep_variants(task, None) == ((False, True) if task_name == "ti2v-5B" else (False,))


def test_per_token_graphs_are_refused_for_tasks_that_have_none(checkpoints, tmp_path, cache_dir):
    result = wanrt("export", "--task", "tiny-t2v", "--ckpt-dir", checkpoints["tiny-t2v"], "--device", "cpu",
                   "--timesteps", "both", "--out", tmp_path / "engines")
    assert_one_line_error(result, "--timesteps both: only ti2v tasks give tokens their own timesteps")
    assert not (tmp_path / "engines").exists()


@pytest.mark.parametrize("option, value, needle", [
    ("--components", "dit_block,dit_head", "--components 'dit_head' is unknown"),
    ("--sizes", "60*64", "--sizes 60*64: width and height must be multiples of 16"),
    ("--frame-nums", "8", "--frame-nums 8 must be 4n+1"),
    ("--frame-nums", "nine", "--frame-nums 'nine' must be comma-separated integers"),
])
def test_bad_export_options_are_one_line_errors(checkpoints, tmp_path, cache_dir, option, value, needle):
    result = wanrt("export", "--task", "tiny-t2v", "--ckpt-dir", checkpoints["tiny-t2v"], "--device", "cpu",
                   "--out", tmp_path / "engines", option, value)
    assert_one_line_error(result, needle)
    assert not (tmp_path / "engines").exists()
