"""Sampling-loop semantics against the official rules, on the official fixture experts and
tiny random checkpoints (expert per step, guide scale per step, i2v and ti2v conditioning)."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES

from wanrt.configs import get_task
from wanrt.demo import write_tiny_checkpoint
from wanrt.errors import InputError
from wanrt.loading.checkpoint import Expert, load_dit, locate_checkpoint
from wanrt.pipelines import (
    GenerationRequest,
    NonFiniteLatentsError,
    Pipeline,
    TextEmbeddings,
    best_output_size,
    i2v_latent_hw,
)
from wanrt.schedulers import make_scheduler

# The fixture experts were saved by the official code: text_dim 4096 (never in config.json).
FIXTURE_T2V = dataclasses.replace(get_task("tiny-t2v"),
                                  dit=dataclasses.replace(get_task("tiny-t2v").dit, text_dim=4096))


@pytest.fixture(scope="module")
def dit_only_checkpoint(tmp_path_factory):
    """Only the two official fixture experts: no T5, no VAE, no tokenizer."""
    root = tmp_path_factory.mktemp("dit_only")
    for expert in ("high_noise_model", "low_noise_model"):
        shutil.copytree(FIXTURES / "dit/t2v" / expert, root / expert)
    return root


def _embeddings(text_dim: int) -> TextEmbeddings:
    generator = torch.Generator().manual_seed(5)
    return TextEmbeddings(torch.randn(7, text_dim, generator=generator),
                          torch.randn(11, text_dim, generator=generator))


def _spy_on_experts(pipeline: Pipeline, calls: list):
    """Record (expert, timestep, y) of every DiT forward."""
    for expert in pipeline.files.dit_dirs:
        model = pipeline.dit(expert)
        original = model.forward

        def forward(x, timestep, context, y=None, seq_len=None, _expert=expert, _original=original):
            calls.append((_expert, timestep.clone(), None if y is None else y.clone()))
            return _original(x, timestep, context, y=y, seq_len=seq_len)
        model.forward = forward


def test_t2v_loop_follows_the_official_rules_with_a_dit_only_folder(dit_only_checkpoint):
    pipeline = Pipeline(FIXTURE_T2V, locate_checkpoint(dit_only_checkpoint, FIXTURE_T2V),
                        torch.device("cpu"), torch.float32)
    embeddings = _embeddings(4096)
    request = GenerationRequest(prompt="unused", size="64*64", frame_num=5, steps=6, seed=3)
    calls: list = []
    _spy_on_experts(pipeline, calls)
    latents = pipeline.sample(request, embeddings=embeddings)
    assert pipeline._text_encoder is None and pipeline._vae is None, "latents-only run loaded T5/VAE"

    # Reference: the official loop written out from its rules, on the same verified parts.
    scheduler = make_scheduler("unipc", steps=6, shift=12.0)
    high = load_dit(dit_only_checkpoint / "high_noise_model")
    low = load_dit(dit_only_checkpoint / "low_noise_model")
    x = torch.randn((1, 16, 2, 8, 8), generator=torch.Generator().manual_seed(3))
    expected_experts = []
    with torch.no_grad():
        for t in scheduler.timesteps.tolist():
            is_high = t >= 0.875 * 1000
            model, scale = (high, 4.0) if is_high else (low, 3.0)
            expected_experts.append(Expert.HIGH_NOISE if is_high else Expert.LOW_NOISE)
            cond = model(x, torch.tensor([t]), embeddings.cond[None])
            uncond = model(x, torch.tensor([t]), embeddings.uncond[None])
            x = scheduler.step(uncond + scale * (cond - uncond), t, x)
    assert torch.equal(latents, x[0])
    # Two forwards (cond, uncond) per step, with the expert chosen by the boundary.
    assert [expert for expert, _, _ in calls[::2]] == expected_experts
    assert expected_experts.count(Expert.HIGH_NOISE) == 4  # 999, 983, 959, 922 >= 875


def test_guide_scale_and_expert_per_step_reported(dit_only_checkpoint):
    pipeline = Pipeline(FIXTURE_T2V, locate_checkpoint(dit_only_checkpoint, FIXTURE_T2V),
                        torch.device("cpu"), torch.float32)
    steps = []
    pipeline.sample(GenerationRequest(prompt="", size="64*64", frame_num=1, steps=4, solver="dpm++",
                                      guide_scale=(2.0, 7.0)),
                    embeddings=_embeddings(4096), on_step=steps.append)
    assert [s.timestep for s in steps] == [1000, 972, 923, 800]  # dpm++ starts at sigma 1, shift 12
    assert [(s.expert, s.guide_scale) for s in steps] == [
        (Expert.HIGH_NOISE, 7.0), (Expert.HIGH_NOISE, 7.0), (Expert.HIGH_NOISE, 7.0), (Expert.LOW_NOISE, 2.0)]


def test_a_run_that_never_crosses_the_boundary_never_loads_the_other_expert(dit_only_checkpoint):
    pipeline = Pipeline(FIXTURE_T2V, locate_checkpoint(dit_only_checkpoint, FIXTURE_T2V),
                        torch.device("cpu"), torch.float32)
    pipeline.sample(GenerationRequest(prompt="", size="64*64", frame_num=1, steps=1),
                    embeddings=_embeddings(4096))
    assert set(pipeline._experts) == {Expert.HIGH_NOISE}


def test_nan_latents_stop_the_run_naming_the_step(dit_only_checkpoint):
    pipeline = Pipeline(FIXTURE_T2V, locate_checkpoint(dit_only_checkpoint, FIXTURE_T2V),
                        torch.device("cpu"), torch.float32)
    model = pipeline.dit(Expert.LOW_NOISE)
    model.forward = lambda x, *args, **kwargs: torch.full_like(x, float("nan"))
    with pytest.raises(NonFiniteLatentsError, match=r"step 5/6 \(t=856\)"):
        pipeline.sample(GenerationRequest(prompt="", size="64*64", frame_num=1, steps=6),
                        embeddings=_embeddings(4096))


@pytest.fixture(scope="module")
def tiny_pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {name: Pipeline.from_pretrained(write_tiny_checkpoint(root / name, get_task(name)), name)
            for name in ("tiny-i2v", "tiny-ti2v")}


def test_i2v_conditioning_is_mask_plus_encoded_image(tiny_pipelines):
    pipeline = tiny_pipelines["tiny-i2v"]
    image = torch.rand(3, 40, 70) * 2 - 1
    calls: list = []
    _spy_on_experts(pipeline, calls)
    latents = pipeline.sample(GenerationRequest(prompt="a cat", image=image, steps=2, seed=1))
    lat_h, lat_w = i2v_latent_hw((40, 70), 64 * 64, pipeline.task)
    assert latents.shape == (16, 3, lat_h, lat_w)
    y = calls[0][2][0]
    assert y.shape == (20, 3, lat_h, lat_w)
    # Mask: pixel frame 0 folded 4x into latent frame 0 -> ones there, zeros elsewhere.
    assert torch.equal(y[:4, 0], torch.ones(4, lat_h, lat_w)) and not y[:4, 1:].any()
    height, width = lat_h * 8, lat_w * 8
    video = torch.cat([F.interpolate(image[None], size=(height, width), mode="bicubic").transpose(0, 1),
                       torch.zeros(3, 8, height, width)], dim=1)
    with torch.no_grad():
        assert torch.equal(y[4:], pipeline.vae.encode(video[None])[0])
    assert all(torch.equal(call[2], calls[0][2]) for call in calls), "y must be the same every step"


def test_ti2v_image_freezes_the_first_latent_frame_with_zero_timesteps(tiny_pipelines):
    pipeline = tiny_pipelines["tiny-ti2v"]
    image = torch.rand(3, 50, 90) * 2 - 1
    calls: list = []
    _spy_on_experts(pipeline, calls)
    steps = []
    latents = pipeline.sample(GenerationRequest(prompt="a dog", image=image, steps=3, seed=2),
                              on_step=steps.append)
    assert latents.shape[:2] == (48, 3)
    tokens_per_frame = latents.shape[2] * latents.shape[3] // 4
    for (_, timestep, _), step in zip(calls[::2], steps):
        assert timestep.shape == (1, 3 * tokens_per_frame)
        assert not timestep[0, :tokens_per_frame].any()
        assert (timestep[0, tokens_per_frame:] == step.timestep).all()
    # Frame 0 is the encoded image after the last step too (re-applied every step).
    first_call = pipeline.sample(GenerationRequest(prompt="a dog", image=image, steps=1, seed=9))
    assert torch.equal(latents[:, 0], first_call[:, 0])


def test_ti2v_without_image_is_plain_t2v_with_scalar_timesteps(tiny_pipelines):
    pipeline = tiny_pipelines["tiny-ti2v"]
    calls: list = []
    _spy_on_experts(pipeline, calls)
    pipeline.sample(GenerationRequest(prompt="a dog", steps=2))
    assert all(timestep.shape == (1,) for _, timestep, _ in calls)


def test_seed_reproducible_and_noise_overridable(tiny_pipelines):
    pipeline = tiny_pipelines["tiny-ti2v"]
    request = GenerationRequest(prompt="a dog", steps=2, seed=11)
    first, again = pipeline.sample(request), pipeline.sample(request)
    other = pipeline.sample(dataclasses.replace(request, seed=12))
    assert torch.equal(first, again) and not torch.equal(first, other)
    noise = torch.randn((48, 3, 4, 8), generator=torch.Generator().manual_seed(11))
    assert torch.equal(pipeline.sample(request, noise=noise), first)


def test_a_run_split_at_the_expert_boundary_equals_the_whole_run(dit_only_checkpoint):
    """What a hand-over between devices or a refine relies on: `denoise` continues a state
    (latents + multistep history) exactly, and the expert follows each step's timestep."""
    pipeline = Pipeline(FIXTURE_T2V, locate_checkpoint(dit_only_checkpoint, FIXTURE_T2V),
                        torch.device("cpu"), torch.float32)
    embeddings = _embeddings(4096)
    request = GenerationRequest(prompt="unused", size="64*64", frame_num=5, steps=6, seed=3)
    whole = pipeline.sample(request, embeddings=embeddings)
    state = pipeline.start(request.resolved(FIXTURE_T2V))
    experts = [expert for _, expert in pipeline.schedule(state)]
    boundary = experts.index(Expert.LOW_NOISE)
    assert 0 < boundary < len(experts) and set(experts[:boundary]) == {Expert.HIGH_NOISE}
    state = pipeline.denoise(state, embeddings, stop=boundary)
    assert state.step == boundary
    assert {expert for _, expert in pipeline.schedule(state)} == {Expert.LOW_NOISE}
    state = pipeline.denoise(state, embeddings)
    assert state.step == 6 and torch.equal(state.latents[0], whole)


def test_wrap_expert_replaces_what_the_loop_calls(dit_only_checkpoint):
    pipeline = Pipeline(FIXTURE_T2V, locate_checkpoint(dit_only_checkpoint, FIXTURE_T2V),
                        torch.device("cpu"), torch.float32)
    wrapped: list = []

    def wrap(expert, model):
        def run(latents, timestep, context, y=None):
            wrapped.append(expert)
            return model(latents, timestep, context, y=y)
        return run
    pipeline.wrap_expert = wrap
    request = GenerationRequest(prompt="unused", size="64*64", frame_num=5, steps=4, seed=3)
    pipeline.sample(request, embeddings=_embeddings(4096))
    # Two forwards (cond, uncond) per step, each through the wrapper of that step's expert.
    experts = [expert for _, expert in pipeline.schedule(pipeline.start(request))]
    assert wrapped == [expert for expert in experts for _ in range(2)]


def test_output_size_rules_match_hand_computed_values():
    # i2v-A14B, 832*480 area, 16:9 image: sqrt(399360*0.5625)=473.96 -> 59 -> 29*2 = 58 rows.
    assert i2v_latent_hw((720, 1280), 832 * 480, get_task("i2v-A14B")) == (58, 104)
    # ti2v-5B, 1280*704 area, 16:9 image: width-first 1248x704 distorts 0.3%, height-first 1280x704 2.3%.
    assert best_output_size(1280, 720, 32, 32, 1280 * 704) == (1248, 704)
    assert best_output_size(720, 1280, 32, 32, 1280 * 704) == (704, 1248)


@pytest.mark.parametrize("changes,message", [
    (dict(frame_num=8), "--frame-num 8 must be 4n\\+1"),
    (dict(size="100*64"), "--size 100\\*64: width and height must be positive multiples of 16 for tiny-t2v"),
    (dict(steps=0), "--steps 0 must be at least 1"),
    (dict(solver="heun"), "--solver 'heun' is unknown"),
    (dict(image=torch.zeros(3, 8, 8)), "tiny-t2v takes no --image"),
])
def test_invalid_requests_are_refused_before_loading(changes, message):
    with pytest.raises(InputError, match=message):
        GenerationRequest(prompt="x", **changes).resolved(get_task("tiny-t2v"))


def test_i2v_requires_an_image():
    with pytest.raises(InputError, match="i2v-A14B needs --image"):
        GenerationRequest(prompt="x").resolved(get_task("i2v-A14B"))


@pytest.mark.parametrize("resident_blocks,depth", [(0, 1), (1, 2)])
def test_streamed_sampling_equals_resident(dit_only_checkpoint, resident_blocks, depth):
    from wanrt.pipelines import StreamingConfig

    files = locate_checkpoint(dit_only_checkpoint, FIXTURE_T2V)
    request = GenerationRequest(prompt="", size="64*64", frame_num=5, steps=6, seed=3)
    resident = Pipeline(FIXTURE_T2V, files, torch.device("cpu"), torch.float32)
    streamed = Pipeline(FIXTURE_T2V, files, torch.device("cpu"), torch.float32,
                        streaming=StreamingConfig(resident_blocks, depth))
    expected = resident.sample(request, embeddings=_embeddings(4096))
    assert torch.equal(streamed.sample(request, embeddings=_embeddings(4096)), expected)
    # Each step runs both experts' streamed blocks twice (CFG); high 4 steps, low 2.
    block_bytes = streamed._streamer._blocks[(Expert.HIGH_NOISE, 1)].nbytes
    assert streamed._streamer.bytes_copied == 6 * 2 * (2 - resident_blocks) * block_bytes


def test_plan_run_sets_up_streaming_or_refuses_before_loading():
    from wanrt.pipelines import MemoryBudget

    task = get_task("t2v-A14B")
    # A CPU text device keeps T5 (11 GB) in host memory too, hence the larger RAM budget.
    pipeline = Pipeline(task, None, torch.device("cpu"), torch.bfloat16, memory=MemoryBudget(24, 80))
    plan = pipeline.plan_run(GenerationRequest(prompt="", size="832*480"))
    assert plan.streaming and pipeline.streaming.resident_blocks == plan.resident_blocks == 22
    assert pipeline.streaming.pin_limit_bytes == plan.pinned_bytes
    small = Pipeline(task, None, torch.device("cpu"), torch.bfloat16, memory=MemoryBudget(8, 64))
    with pytest.raises(InputError, match="does not fit the budget"):
        small.plan_run(GenerationRequest(prompt="", size="1280*720"))
    assert not small._experts  # nothing was loaded


@pytest.mark.parametrize("precision,budget", [("fp8", 5e-2), ("int8", 2e-2)])
def test_quantized_experts_sample_within_budget(tmp_path, precision, budget):
    """Four blocks: the default policy quantizes the middle two (20 of the 46 Linears)."""
    tiny = get_task("tiny-t2v")
    task = dataclasses.replace(tiny, dit=dataclasses.replace(tiny.dit, num_layers=4))
    files = locate_checkpoint(write_tiny_checkpoint(tmp_path / "four_blocks", task), task)
    request = GenerationRequest(prompt="", steps=3, seed=4)
    embeddings = _embeddings(32)
    reference = Pipeline(task, files, torch.device("cpu"), torch.float32).sample(request, embeddings=embeddings)
    pipeline = Pipeline(task, files, torch.device("cpu"), torch.float32, precision=precision)
    latents = pipeline.sample(request, embeddings=embeddings)
    assert pipeline.quant_summaries["high_noise"].startswith(f"{precision}: 20/46 linears quantized")
    error = ((latents - reference).norm() / reference.norm()).item()
    assert 0 < error <= budget, error


def test_quantize_checkpoint_then_generate_from_it(tmp_path):
    from wanrt.export.quantize import Float8Linear
    from wanrt.quantize_checkpoint import quantize_checkpoint

    tiny = get_task("tiny-t2v")
    task = dataclasses.replace(tiny, dit=dataclasses.replace(tiny.dit, num_layers=4))
    root = write_tiny_checkpoint(tmp_path / "four_blocks", task)
    source = Pipeline(task, locate_checkpoint(root, task), torch.device("cpu"), torch.float32)
    results = quantize_checkpoint(source, tmp_path / "fp8", "fp8", prompt="a cat on the beach")
    assert [r.expert for r in results] == [Expert.HIGH_NOISE, Expert.LOW_NOISE]
    for result in results:
        assert (result.folder / "quantization.json").is_file()
        quantized = [layer for layer in result.report.layers if layer.quantized]
        assert len(quantized) + sum(layer.reason.startswith("guard") for layer in result.report.layers) == 20
    pipeline = Pipeline(task, locate_checkpoint(root, task), torch.device("cpu"), torch.float32,
                        quantized_dir=tmp_path / "fp8")
    request = GenerationRequest(prompt="", steps=3, seed=4)
    latents = pipeline.sample(request, embeddings=_embeddings(32))
    assert pipeline.precision == "fp8"
    assert any(isinstance(m, Float8Linear) for m in pipeline.dit(Expert.LOW_NOISE).modules())
    reference = source.sample(request, embeddings=_embeddings(32))
    error = ((latents - reference).norm() / reference.norm()).item()
    assert 0 < error <= 5e-2, error
    with pytest.raises(InputError, match="cannot be combined with --quantized"):
        Pipeline(task, None, torch.device("cpu"), torch.float32, precision="int8", quantized_dir=tmp_path / "fp8")
