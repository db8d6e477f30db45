"""Fewer forwards per video: the distilled 4-step sampler against a hand-written loop,
CFG-free steps at guide scale 1, the EasyCache step cache, and the CLI around them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_cli import PROMPT, assert_one_line_error, wanrt
from test_lora import TASK, pair, tiny_dit

from wanrt.errors import InputError
from wanrt.loading.checkpoint import Expert
from wanrt.lora import parameter_shapes
from wanrt.pipelines import GenerationRequest, Guidance, Pipeline, StreamingConfig, TextEmbeddings, noise_for
from wanrt.runtime.step_cache import StepCacheConfig
from wanrt.schedulers import make_scheduler

EMBEDDINGS = TextEmbeddings(torch.randn(7, TASK.dit.text_dim, generator=torch.Generator().manual_seed(5)),
                            torch.randn(5, TASK.dit.text_dim, generator=torch.Generator().manual_seed(6)))


@pytest.fixture(scope="module")
def experts() -> dict[Expert, torch.nn.Module]:
    return {Expert.HIGH_NOISE: tiny_dit(1), Expert.LOW_NOISE: tiny_dit(2)}


def test_distill_schedule_is_lightx2v_s_exactly():
    scheduler = make_scheduler("distill", 4, 5.0)
    # sigma = 5s / (1 + 4s) at s = 1, 0.75, 0.5, 0.25; t = 1000 sigma in float32, not truncated.
    expected = torch.tensor([1000.0, 937.5, 2500 / 3, 625.0], dtype=torch.float32)
    assert scheduler.timesteps.dtype == torch.float32 and torch.equal(scheduler.timesteps, expected)
    assert torch.equal(scheduler.sigmas, torch.cat([expected / 1000, torch.zeros(1)]))
    assert scheduler.boundary_step_index == 2
    assert make_scheduler("distill", 8, 5.0).timesteps.shape == (8,)  # 1000, 875, ..., 125


def test_distilled_run_equals_a_hand_written_reference_loop(experts):
    pipeline = Pipeline.from_models(TASK, experts)
    steps = []
    latents = pipeline.sample(GenerationRequest(prompt="", size="64*64", frame_num=5, solver="distill", seed=3),
                              embeddings=EMBEDDINGS, on_step=steps.append)
    assert pipeline.dit_forwards == 4  # one conditional forward per step, no CFG
    assert [s.expert for s in steps] == [Expert.HIGH_NOISE] * 2 + [Expert.LOW_NOISE] * 2

    # LightX2V's loop written out: sigma from the shifted training table, x0 = x - sigma v,
    # then x0 + sigma_next v (sigma_next = 0 after the last step).
    sigmas = [5 * s / (1 + 4 * s) for s in (1.0, 0.75, 0.5, 0.25)] + [0.0]
    x = noise_for((16, 2, 8, 8), 3)[None]
    euler = x.clone()
    with torch.no_grad():
        for i in range(4):
            model = experts[Expert.HIGH_NOISE if i < 2 else Expert.LOW_NOISE]
            t = torch.tensor([np.float32(1000 * sigmas[i])])
            velocity = model(x, t, EMBEDDINGS.cond[None])
            x = (x - np.float32(sigmas[i]) * velocity) + np.float32(sigmas[i + 1]) * velocity
            euler = euler + (sigmas[i + 1] - sigmas[i]) * model(euler, t, EMBEDDINGS.cond[None])
    assert torch.equal(latents, x[0])
    assert (latents - euler[0]).abs().max() <= 1e-5  # the same Euler step, other rounding order


def test_distill_experts_split_by_step_index_not_timestep(experts):
    """1000,500,400,300 at shift 5: t = 1000, 833, 769, 682; 833 is below the 875 boundary,
    yet the second step runs the high-noise expert (LightX2V's boundary_step_index)."""
    steps = []
    Pipeline.from_models(TASK, experts).sample(
        GenerationRequest(prompt="", size="64*64", frame_num=1, solver="distill",
                          denoising_steps=(1000, 500, 400, 300)),
        embeddings=EMBEDDINGS, on_step=steps.append)
    assert steps[1].timestep < 875
    assert [s.expert for s in steps] == [Expert.HIGH_NOISE] * 2 + [Expert.LOW_NOISE] * 2


def test_dit_takes_a_fractional_timestep_as_is(experts):
    model = experts[Expert.LOW_NOISE]
    x = torch.randn(1, 16, 1, 8, 8)
    with torch.no_grad():
        outputs = [model(x, torch.tensor([t]), EMBEDDINGS.cond[None]) for t in (833.0, 2500 / 3, 834.0)]
    assert not torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[1], outputs[2])


class _AlwaysTwoForwards(Guidance):
    """The official CFG arithmetic with both forwards whatever the scale."""

    def forwards_for(self, scale: float) -> int:
        return 2

    def __call__(self, forward, latents, timestep, cond, uncond, y, scale):
        pred_cond, pred_uncond = forward(latents, timestep, cond, y=y), forward(latents, timestep, uncond, y=y)
        return pred_uncond + scale * (pred_cond - pred_uncond)


@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
def test_guide_scale_one_runs_one_forward_per_step_and_equals_cfg(experts, solver):
    request = GenerationRequest(prompt="", size="64*64", frame_num=5, steps=5, solver=solver, guide_scale=1.0)
    cfg_free = Pipeline.from_models(TASK, experts)
    latents = cfg_free.sample(request, embeddings=EMBEDDINGS)
    two_forwards = Pipeline.from_models(TASK, experts)
    two_forwards.guidance = _AlwaysTwoForwards()
    reference = two_forwards.sample(request, embeddings=EMBEDDINGS)
    assert (cfg_free.dit_forwards, two_forwards.dit_forwards) == (5, 10)
    # u + 1 * (c - u) is c up to float32 rounding: 1e-6 relative to the latents' magnitude.
    assert (latents - reference).abs().max() <= 1e-6 * reference.abs().max()


def test_streamer_is_told_one_forward_per_cfg_free_step(experts):
    """The block streamer prefetches what it is told will run: at guide scale 1 that is one
    forward per step, so it copies exactly the blocks of 4 forwards and nothing more."""
    request = GenerationRequest(prompt="", size="64*64", frame_num=1, solver="distill", seed=2)
    expected = Pipeline.from_models(TASK, experts).sample(request, embeddings=EMBEDDINGS)
    streamed = Pipeline.from_models(TASK, experts)
    streamed.streaming = StreamingConfig(resident_blocks=0, depth=1)
    assert torch.equal(streamed.sample(request, embeddings=EMBEDDINGS), expected)
    block_bytes = streamed._streamer._blocks[(Expert.HIGH_NOISE, 1)].nbytes
    assert streamed._streamer.bytes_copied == 4 * TASK.dit.num_layers * block_bytes


def test_guide_scale_one_on_one_expert_only(experts):
    request = GenerationRequest(prompt="", size="64*64", frame_num=1, steps=6, guide_scale=(1.0, 4.0))
    pipeline = Pipeline.from_models(TASK, experts)
    steps = []
    pipeline.sample(request, embeddings=EMBEDDINGS, on_step=steps.append)
    high = sum(s.expert is Expert.HIGH_NOISE for s in steps)
    assert pipeline.dit_forwards == 2 * high + (6 - high)


def test_easycache_skips_steps_within_a_stated_error_and_resets_at_the_boundary(experts):
    """Measured on the tiny random experts (20 unipc steps, CFG 4/3, one latent frame):
    threshold 0.5 reuses 5 steps (30 forwards instead of 40) at a relative L2 error of 2.3%
    (max abs 0.13 on latents up to ~4) in the final latents. The random experts change their
    output ~5-100x faster than their input (EasyCache's k), so the paper's 0.05 skips
    nothing here."""
    request = GenerationRequest(prompt="", size="64*64", frame_num=1, steps=20, seed=3)
    reference = Pipeline.from_models(TASK, experts).sample(request, embeddings=EMBEDDINGS)
    pipeline = Pipeline.from_models(TASK, experts)
    pipeline.step_cache = StepCacheConfig.parse("easycache:0.5")
    steps = []
    latents = pipeline.sample(request, embeddings=EMBEDDINGS, on_step=steps.append)
    skipped = pipeline.cached_steps
    assert skipped and pipeline.dit_forwards == 2 * (20 - len(skipped))
    first_low = next(s.index for s in steps if s.expert is Expert.LOW_NOISE)
    # Warm-up (ceil(0.175 * 20) = 4 steps), the last step, and the two steps after the
    # expert switch (a fresh k needs two computed steps) always compute.
    assert min(skipped) >= 4 and 19 not in skipped and not {first_low, first_low + 1} & set(skipped)
    assert ((latents - reference).norm() / reference.norm()).item() < 0.05
    # A threshold nothing reaches is the uncached run, bit for bit.
    pipeline.step_cache = StepCacheConfig.parse("easycache:1e-9")
    assert torch.equal(pipeline.sample(request, embeddings=EMBEDDINGS), reference) and not pipeline.cached_steps


def test_cache_option_errors_name_the_flag():
    for text, needle in (("teacache:0.1", "--cache 'teacache' is unknown"),
                         ("easycache:x", "KIND:THRESHOLD"), ("easycache:0", "threshold must be > 0")):
        with pytest.raises(InputError, match=needle):
            StepCacheConfig.parse(text)


# ---------------------------------------------------------------------- CLI


def _lightning_like_lora(path, seed: int) -> None:
    shapes = parameter_shapes(tiny_dit())
    tensors = {}
    for module in ("blocks.0.self_attn.q", "blocks.1.ffn.2"):
        down, up = pair(shapes[f"{module}.weight"], seed)
        tensors |= {f"diffusion_model.{module}.lora_down.weight": down, f"diffusion_model.{module}.lora_up.weight": up,
                    f"diffusion_model.{module}.alpha": torch.tensor(8.0)}
    save_file(tensors, path)


@pytest.mark.usefixtures("cache_dir")
def test_cli_four_step_lora_run_records_loras_forwards_and_schedule(checkpoints, tmp_path):
    high, low = tmp_path / "high.safetensors", tmp_path / "low.safetensors"
    _lightning_like_lora(high, 1)
    _lightning_like_lora(low, 2)
    common = ["generate", "--task", "tiny-t2v", "--ckpt-dir", checkpoints["tiny-t2v"], "--prompt", PROMPT,
              "--frame-num", 1, "--seed", 4, "--sampler", "distill", "--no-embedding-cache"]
    result = wanrt(*common, "--lora-high", f"{high}:1.0", "--lora-low", f"{low}:0.5", "--precision", "fp8",
                   "--cache", "easycache:0.05", "--output", tmp_path / "fast.mp4")
    assert result.exit_code == 0, result.output
    assert "dit forwards: 4" in result.stdout
    sidecar = json.loads((tmp_path / "fast.json").read_text())
    assert sidecar["runtime"]["dit_forwards"] == 4
    assert sidecar["settings"]["steps"] == 4 and sidecar["settings"]["shift"] == 5.0
    assert sidecar["settings"]["guide_scale"] == [1.0, 1.0]
    assert [(r["file"], r["strength"], r["expert"]) for r in sidecar["runtime"]["loras"]] == [
        (str(high), 1.0, "high_noise"), (str(low), 0.5, "low_noise")]
    assert sidecar["runtime"]["loras"][0]["patched_parameters"] == 2
    # 4 steps: warm-up 1, a fresh k after the expert switch, the last step: nothing to reuse.
    assert sidecar["runtime"]["step_cache"] == {"kind": "easycache", "threshold": 0.05, "warmup_steps": 1,
                                                "skipped_steps": []}


@pytest.mark.usefixtures("cache_dir")
@pytest.mark.parametrize("case", ["missing", "unknown-keys", "pickle", "list-without-distill", "bad-list"])
def test_cli_bad_lora_and_sampler_options_exit_2_before_sampling(checkpoints, tmp_path, case):
    down, up = pair((64, 64), 0)
    if case == "unknown-keys":
        save_file({"diffusion_model.blocks.7.self_attn.q.lora_down.weight": down,
                   "diffusion_model.blocks.7.self_attn.q.lora_up.weight": up}, tmp_path / "l.safetensors")
    if case == "pickle":
        torch.save({"x": torch.zeros(1), "y": [object]}, tmp_path / "l.ckpt")
    extra, needles = {
        "missing": (["--lora", tmp_path / "nowhere.safetensors"], ["--lora", "not found"]),
        "unknown-keys": (["--lora", f"{tmp_path / 'l.safetensors'}:0.8"], ["--lora", "blocks.7.self_attn.q"]),
        "pickle": (["--lora-low", tmp_path / "l.ckpt"], ["--lora-low", "refused to load"]),
        "list-without-distill": (["--denoising-step-list", "1000,500"], ["--denoising-step-list", "distill"]),
        "bad-list": (["--sampler", "distill", "--denoising-step-list", "1000,1000"], ["--denoising-step-list"]),
    }[case]
    result = wanrt("generate", "--task", "tiny-t2v", "--ckpt-dir", checkpoints["tiny-t2v"], "--prompt", PROMPT,
                   "--output", tmp_path / "video.mp4", *extra)
    assert_one_line_error(result, *needles)
    assert not list(tmp_path.glob("video*"))


@pytest.mark.usefixtures("cache_dir")
def test_repeated_lora_options_reach_every_torchrun_process(checkpoints, tmp_path, monkeypatch):
    import wanrt.cli.generate as generate_cli

    launched = []
    monkeypatch.setattr(generate_cli, "check_gpu_count", lambda gpus, device: None)
    monkeypatch.setattr(generate_cli, "relaunch", lambda gpus, arguments: launched.append(arguments) or 0)
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _lightning_like_lora(first, 1)
    _lightning_like_lora(second, 2)
    result = wanrt("generate", "--task", "tiny-t2v", "--ckpt-dir", checkpoints["tiny-t2v"], "--prompt", PROMPT,
                   "--gpus", 2, "--lora", f"{first}:0.5", "--lora", second, "--lora-low", first,
                   "--output", tmp_path / "video.mp4")
    assert result.exit_code == 0, result.output
    (arguments,) = launched
    assert "--gpus" not in arguments
    options = list(zip(arguments, arguments[1:]))
    assert [option for option in options if option[0].startswith("--lora")] == [
        ("--lora", f"{first}:0.5"), ("--lora", str(second)), ("--lora-low", str(first))]
