"""`wanrt preview` and `wanrt refine` on tiny random-weight checkpoints (CPU, float32).

Random weights make the videos noise, and the random VAE does not reconstruct its input, so
"close to the input" is measured against what a refine can at best return: the source
re-encoded (strength 0), in latent space, relative to a plain generation's distance.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import assert_one_line_error
from typer.testing import CliRunner
from wanrt.cli.app import app

from wanrt.configs import get_task
from wanrt.generate import EmbeddingCache, read_latents
from wanrt.hashing import file_sha256
from wanrt.loading.checkpoint import Expert
from wanrt.pipelines import GenerationRequest, Pipeline, noise_for
from wanrt.preview import (CONTACT_SHEET_NAME, INDEX_NAME, LABEL_HEIGHT, SHEET_PADDING, preview_request,
                           run_preview, sheet_frame_indices, thumbnail_scale)
from wanrt.refine import (fit_frames, read_preview_pick, read_source, refine_frame_count, refine_latents,
                          refine_schedule, refine_start, start_step)
from wanrt.video_io import frames_to_uint8, read_video, write_video

PROMPT = "a cat on the beach at sunset"
BASE_SEED = 5
COUNT = 3
HIGH, LOW = Expert.HIGH_NOISE, Expert.LOW_NOISE
runner = CliRunner()


def wanrt(*args: object):
    return runner.invoke(app, [str(arg) for arg in args])


def tiny_pipeline(checkpoints, task: str = "tiny-t2v") -> Pipeline:
    return Pipeline.from_pretrained(checkpoints[task], task, device="cpu")


@pytest.fixture(scope="module")
def preview(checkpoints, tmp_path_factory):
    """One tiny-t2v preview of COUNT candidates, and how often the text encoder ran."""
    root = tmp_path_factory.mktemp("preview")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANRT_CACHE_DIR", str(root / "cache"))
        pipeline = tiny_pipeline(checkpoints)
        encodes = []
        encode_text = pipeline.encode_text
        pipeline.encode_text = lambda *prompts: encodes.append(prompts) or encode_text(*prompts)
        index = run_preview(pipeline, GenerationRequest(prompt=PROMPT, seed=BASE_SEED), COUNT, root / "p",
                            embedding_cache=None)
    return index, len(encodes)


def candidate_latents(index, number: int) -> torch.Tensor:
    return read_latents(index.folder / index.candidates[number].latents)[0]


# ---------------------------------------------------------------------- preview


def test_preview_candidates_are_distinct_reproducible_and_share_one_prompt_encoding(preview, checkpoints):
    index, encodes = preview
    raw = json.loads((index.folder / INDEX_NAME).read_text())
    assert raw["task"] == "tiny-t2v" and raw["base_seed"] == BASE_SEED and raw["seed_was_random"] is False
    assert [c["seed"] for c in raw["candidates"]] == [BASE_SEED + i for i in range(COUNT)]
    # The tiny task's preview defaults, not its generation defaults (64*64, 6 steps).
    assert (raw["settings"]["size"], raw["settings"]["steps"], raw["settings"]["frame_num"]) == ("32*32", 3, 9)
    assert encodes == 1
    sidecars = [json.loads((index.folder / c.sidecar).read_text()) for c in index.candidates]
    assert [s["runtime"]["embedding_cache"] for s in sidecars] == ["miss", "hit", "hit"]
    assert [s["seed"] for s in sidecars] == [BASE_SEED + i for i in range(COUNT)]

    latents = [candidate_latents(index, i) for i in range(COUNT)]
    assert latents[0].shape == (16, 3, 4, 4)
    for i in range(COUNT):
        for j in range(i + 1, COUNT):
            assert (latents[i] - latents[j]).abs().max() > 0.5, f"candidates {i} and {j} are not distinct"
    # Candidate 1 again, from its seed alone, in a fresh pipeline: bit for bit.
    task = get_task("tiny-t2v")
    request = preview_request(task, GenerationRequest(prompt=PROMPT, seed=BASE_SEED + 1))
    again = tiny_pipeline(checkpoints).sample(request)
    assert torch.equal(again, latents[1])


def test_preview_reads_and_fills_the_disk_embedding_cache(checkpoints, tmp_path, cache_dir):
    cache = EmbeddingCache(tmp_path / "embeddings")
    states = []
    for run in ("first", "second"):
        pipeline = tiny_pipeline(checkpoints)
        encodes = []
        encode_text = pipeline.encode_text
        pipeline.encode_text = lambda *prompts: encodes.append(prompts) or encode_text(*prompts)
        index = run_preview(pipeline, GenerationRequest(prompt=PROMPT, seed=1, frame_num=1), 2, tmp_path / run,
                            embedding_cache=cache)
        states.append([json.loads((index.folder / c.sidecar).read_text())["runtime"]["embedding_cache"]
                       for c in index.candidates])
        assert len(encodes) == (1 if run == "first" else 0)
    assert states == [["miss", "hit"], ["hit", "hit"]]
    assert len(list((tmp_path / "embeddings").glob("*.safetensors"))) == 2  # prompt and negative prompt


def test_contact_sheet_shows_first_middle_last_frame_of_each_candidate(preview):
    index, _ = preview
    sheet = np.asarray(Image.open(index.folder / CONTACT_SHEET_NAME).convert("RGB"))
    scale = int(thumbnail_scale(32))  # 32-pixel frames are enlarged 3x, pixel-exact
    thumb = 32 * scale
    assert sheet.shape == (COUNT * (LABEL_HEIGHT + thumb + SHEET_PADDING) + SHEET_PADDING,
                           3 * thumb + 4 * SHEET_PADDING, 3)
    for row, candidate in enumerate(index.candidates):
        video = read_video(index.folder / candidate.video)[0]
        top = SHEET_PADDING + row * (LABEL_HEIGHT + thumb + SHEET_PADDING) + LABEL_HEIGHT
        for column, frame in enumerate(sheet_frame_indices(video.shape[1])):
            left = SHEET_PADDING + column * (thumb + SHEET_PADDING)
            tile = sheet[top:top + thumb:scale, left:left + thumb:scale]
            expected = frames_to_uint8(video[:, frame]).permute(1, 2, 0).numpy()
            assert np.array_equal(tile, expected), f"candidate {row}, frame {frame}"


@pytest.mark.parametrize("mode", ["candidates-dealt", "expert-per-gpu"])
def test_preview_over_two_torchrun_ranks_equals_one_process(preview, checkpoints, tmp_path, mode):
    """2 ranks (gloo, CPU): candidates dealt round-robin, or the two experts split across the
    ranks with the candidates pipelined through them; rank 0 alone writes the sheet and index."""
    index, _ = preview
    folder = tmp_path / "p2"
    env = {**os.environ, "WANRT_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", 2, "-m", "wanrt",
               "preview", "--task", "tiny-t2v", "--ckpt-dir", checkpoints["tiny-t2v"], "--prompt", PROMPT,
               "--count", COUNT, "--seed", BASE_SEED, "--device", "cpu", "--out", folder, "--no-embedding-cache"]
    if mode == "expert-per-gpu":
        command.append("--expert-per-gpu")
    result = subprocess.run([str(part) for part in command], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    raw = json.loads((folder / INDEX_NAME).read_text())
    assert raw["world_size"] == 2 and [c["seed"] for c in raw["candidates"]] == [5, 6, 7]
    assert (folder / CONTACT_SHEET_NAME).is_file()
    options = [json.loads((folder / c["sidecar"]).read_text())["options"] for c in raw["candidates"]]
    assert [o["candidate"] for o in options] == [0, 1, 2]
    assert all(o["preview"]["expert_per_gpu"] is (mode == "expert-per-gpu") for o in options)
    # Split experts: rank 0 only decodes latents the two stages sampled (no local sampling).
    sampled_locally = [json.loads((folder / c["sidecar"]).read_text())["timings_s"]["sampling"]
                       for c in raw["candidates"]]
    assert all(bool(timings) is (mode == "candidates-dealt") for timings in sampled_locally)
    for number, candidate in enumerate(raw["candidates"]):
        distributed = read_latents(folder / candidate["latents"])[0]
        error = (distributed - candidate_latents(index, number)).abs().max().item()
        assert error <= 1e-5, f"candidate {number}: max abs {error:.3g} vs the single-process preview"


# ---------------------------------------------------------------------- refine: schedule


def test_refine_schedule_for_t2v_a14b_defaults():
    """40 UniPC steps at shift 12, boundary 0.875 (t >= 875 is the high-noise expert).

    Step i has sigma = s / (1 + 11 s) * 12 with s = 0.999 (1 - i/40) and timestep
    int(1000 sigma): i = 25 gives 877 (the last high-noise step), i = 26 gives 865. The first
    step with sigma <= 0.9 is i = 23 (0.8985; i = 22 has 0.9074), with sigma <= 0.5 it is
    i = 37 (0.4929; i = 36 has 0.5712).
    """
    task = get_task("t2v-A14B")
    pipeline = Pipeline(task, None, torch.device("cpu"), torch.float32)
    request = GenerationRequest(prompt="x").resolved(task)
    full = refine_schedule(pipeline, request, 1.0)
    assert full.start_step == 0 and len(full.steps) == 40
    assert [expert for _, expert in full.steps] == [HIGH] * 26 + [LOW] * 14
    assert full.steps[25] == (877, HIGH) and full.steps[26] == (865, LOW)

    strong = refine_schedule(pipeline, request, 0.9)
    assert strong.start_step == 23 and abs(strong.start_sigma - 0.89852) < 1e-5
    assert strong.steps[:4] == ((898, HIGH), (888, HIGH), (877, HIGH), (865, LOW))
    assert len(strong.steps) == 17 and strong.steps == full.steps[23:]
    assert strong.describe() == "steps 23..39 of 40 from sigma 0.8985 (3 high-noise, 14 low-noise)"

    half = refine_schedule(pipeline, request, 0.5)
    assert half.start_step == 37 and half.steps == ((492, LOW), (386, LOW), (235, LOW))
    assert refine_schedule(pipeline, request, 0.3).steps == ((235, LOW),)
    none = refine_schedule(pipeline, request, 0.0)
    assert (none.start_step, none.steps, none.start_sigma) == (40, (), 0.0)
    assert none.describe() == "no step: strength 0 returns the source re-encoded"


def test_start_step_is_the_first_sigma_at_most_the_strength():
    sigmas = torch.tensor([1.0, 0.8, 0.5, 0.2, 0.0])
    assert [start_step(sigmas, s) for s in (1.0, 0.9, 0.8, 0.79, 0.5, 0.1, 0.0)] == [0, 1, 1, 2, 2, 4, 4]


# ---------------------------------------------------------------------- refine: numbers


def test_refine_at_strength_1_equals_generate_and_records_what_ran(preview, checkpoints, tmp_path, cache_dir):
    index, _ = preview
    refined = wanrt("refine", "--from", index.folder, "--pick", 1, "--strength", 1, "--output", tmp_path / "r.mp4")
    assert refined.exit_code == 0, refined.output
    generated = wanrt("generate", "--task", "tiny-t2v", "--ckpt-dir", checkpoints["tiny-t2v"], "--prompt", PROMPT,
                      "--seed", BASE_SEED + 1, "--frame-num", 9, "--output", tmp_path / "g.mp4")
    assert generated.exit_code == 0, generated.output
    latents = [read_latents(tmp_path / f"{name}.latents.safetensors")[0] for name in ("r", "g")]
    assert torch.equal(*latents)
    assert torch.equal(read_video(tmp_path / "r.mp4")[0], read_video(tmp_path / "g.mp4")[0])

    sidecar = json.loads((tmp_path / "r.json").read_text())
    record = sidecar["options"]["refine"]
    source = index.folder / index.candidates[1].video
    assert record["source"]["sha256"] == file_sha256(source)
    assert record["source"]["preview"] == {"folder": str(index.folder.absolute()), "pick": 1, "seed": 6}
    assert (record["strength"], record["start_step"], record["total_steps"]) == (1.0, 0, 6)
    assert record["steps"] == [[999, "high_noise"], [983, "high_noise"], [959, "high_noise"],
                               [922, "high_noise"], [856, "low_noise"], [705, "low_noise"]]
    # Target size: the task's first official size; fps: the source's.
    assert (sidecar["settings"]["size"], sidecar["seed"], sidecar["fps"]) == ("64*64", 6, 16)


def test_refine_runs_the_recorded_steps_with_the_boundary_expert(preview, checkpoints):
    """Strength 0.95 on the tiny schedule (sigmas .9999 .983 .959 .923 .857 .706) starts at
    step 3 (t=922, high-noise) and hands over to the low-noise expert at 856."""
    index, source = read_preview_pick(preview[0].folder, 0)
    pipeline = tiny_pipeline(checkpoints)
    request = GenerationRequest(prompt=PROMPT, seed=5, frame_num=9).resolved(pipeline.task)
    ran = []
    refine_latents(pipeline, request, source.video, 0.95,
                   pipeline.encode_text(request.prompt, request.negative_prompt),
                   on_step=lambda info: ran.append((info.index, info.timestep, info.expert)))
    assert ran == [(3, 922, HIGH), (4, 856, LOW), (5, 705, LOW)]
    scheduled = refine_schedule(pipeline, request, 0.95)
    assert [(t, e) for _, t, e in ran] == list(scheduled.steps)


def test_refine_start_noises_the_encoded_source_to_the_start_sigma(preview, checkpoints):
    _, source = read_preview_pick(preview[0].folder, 2)
    pipeline = tiny_pipeline(checkpoints)
    request = GenerationRequest(prompt=PROMPT, seed=11, steps=10, shift=1.0).resolved(pipeline.task)
    state = refine_start(pipeline, request, source.video, 0.25)
    # sigmas 0.999 (1 - i/10): the first <= 0.25 is i = 8, sigma 0.1998.
    assert state.step == 8
    sigma = state.scheduler.sigmas[8]
    assert abs(sigma.item() - 0.1998) < 1e-6
    x0 = pipeline.vae.encode(fit_frames(source.video, 64, 64)[None])
    expected = (1 - sigma) * x0 + sigma * noise_for(tuple(x0.shape[1:]), 11)[None]
    assert torch.equal(state.latents, expected)


def test_refine_at_strength_0_is_the_source_reencoded(preview, checkpoints):
    _, source = read_preview_pick(preview[0].folder, 0)
    pipeline = tiny_pipeline(checkpoints)
    request = GenerationRequest(prompt=PROMPT, seed=3).resolved(pipeline.task)
    embeddings = pipeline.encode_text(request.prompt, request.negative_prompt)
    latents = refine_latents(pipeline, request, source.video, 0.0, embeddings)
    encoded = pipeline.vae.encode(fit_frames(source.video, 64, 64)[None])[0]
    assert torch.equal(latents, encoded)
    assert torch.equal(pipeline.decode(latents), pipeline.vae.decode(encoded[None])[0])


def test_low_strength_stays_close_to_the_input(preview, checkpoints):
    """Measured on the random tiny model (10 steps, shift 1, so low strengths run steps):
    ||z - x0|| / ||x0|| is 0.58 at strength 0.1 (1 step), 1.30 at 0.25 (2 steps), 3.0 at
    0.5 and 4.68 for a plain generation (strength 1): it grows with the strength, and at
    0.1 it is 1/8 of a generation's. In pixels the mean abs difference to the re-encoded
    source is 0.45 at 0.1 vs 0.57 for a generation (the random decoder saturates)."""
    _, source = read_preview_pick(preview[0].folder, 1)
    pipeline = tiny_pipeline(checkpoints)
    request = GenerationRequest(prompt=PROMPT, seed=6, steps=10, shift=1.0).resolved(pipeline.task)
    embeddings = pipeline.encode_text(request.prompt, request.negative_prompt)
    x0 = pipeline.vae.encode(fit_frames(source.video, 64, 64)[None])[0]

    def distance(strength: float) -> float:
        latents = refine_latents(pipeline, request, source.video, strength, embeddings)
        return ((latents - x0).norm() / x0.norm()).item()
    distances = {strength: distance(strength) for strength in (0.1, 0.25, 0.5, 1.0)}
    values = list(distances.values())
    assert values == sorted(values), distances
    assert distances[0.1] < 0.2 * distances[1.0], distances
    assert distances[0.1] < 0.7, distances


# ---------------------------------------------------------------------- refine: sources


def test_fit_frames_covers_then_centre_crops():
    video = torch.rand(3, 5, 4, 6) * 2 - 1
    assert torch.equal(fit_frames(video, 4, 6), video)  # already the target size: untouched
    assert torch.equal(fit_frames(video, 4, 4), video[:, :, :, 1:5])  # no scaling, a centre crop
    flat = torch.full((3, 1, 32, 32), 0.25)
    scaled = fit_frames(flat, 64, 128)  # x4 to 128x128, rows 32..96 kept
    assert scaled.shape == (3, 1, 64, 128) and torch.allclose(scaled, torch.full_like(scaled, 0.25))


def test_refine_frame_count_trims_to_4n_plus_1():
    assert [refine_frame_count(t, None) for t in (1, 4, 5, 11, 81, 84)] == [1, 1, 5, 9, 81, 81]
    assert refine_frame_count(11, 5) == 5


def test_refine_an_init_video_for_i2v_and_ti2v(checkpoints, tmp_path, cache_dir):
    """Any video: 11 frames trimmed to 9, 24 fps kept; i2v conditions on its first frame,
    ti2v (no image) is refined to its 128*64 target from a 64*64 source."""
    frames = torch.linspace(-1, 1, 11)[None, :, None, None].expand(3, 11, 64, 64).contiguous()
    source_path = tmp_path / "source.mp4"
    write_video(frames, source_path, fps=24)
    source = read_source(source_path)
    for task, size in (("tiny-i2v", "64*64"), ("tiny-ti2v", "128*64")):
        output = tmp_path / f"{task}.mp4"
        result = wanrt("refine", "--init-video", source_path, "--task", task, "--ckpt-dir", checkpoints[task],
                       "--prompt", PROMPT, "--seed", 2, "--strength", 0.9, "--output", output)
        assert result.exit_code == 0, result.output
        sidecar = json.loads(output.with_suffix(".json").read_text())
        width, height = (int(v) for v in size.split("*"))
        assert read_video(output)[0].shape == (3, 9, height, width)
        assert sidecar["fps"] == 24 and sidecar["options"]["refine"]["frames_used"] == 9
        assert sidecar["options"]["refine"]["start_step"] > 0
    i2v = json.loads((tmp_path / "tiny-i2v.json").read_text())
    first_frame = source.video[:, 0].contiguous()
    assert i2v["image"]["float32_sha256"] == hashlib.sha256(first_frame.numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------------- CLI errors


REFINE_ERRORS = {
    "strength-above-1": (lambda p, t: ["--from", p, "--pick", 0, "--strength", 1.5], "--strength"),
    "strength-negative": (lambda p, t: ["--from", p, "--pick", 0, "--strength", -0.1], "--strength"),
    "no-source": (lambda p, t: ["--prompt", PROMPT], "--init-video"),
    "both-sources": (lambda p, t: ["--from", p, "--pick", 0, "--init-video", p / "candidate_00.mp4"],
                     "--init-video"),
    "from-without-pick": (lambda p, t: ["--from", p], "--pick"),
    "pick-out-of-range": (lambda p, t: ["--from", p, "--pick", COUNT], "--pick 3 is out of range"),
    "pick-negative": (lambda p, t: ["--from", p, "--pick", -1], "--pick -1 is out of range"),
    "pick-without-from": (lambda p, t: ["--init-video", p / "candidate_00.mp4", "--pick", 1], "--pick"),
    "from-not-a-preview": (lambda p, t: ["--from", t, "--pick", 0], "--from"),
    "init-video-missing": (lambda p, t: ["--init-video", t / "none.mp4", "--prompt", PROMPT], "--init-video"),
    "frame-num-beyond-source": (lambda p, t: ["--from", p, "--pick", 0, "--frame-num", 13], "--frame-num"),
    "bad-target-size": (lambda p, t: ["--from", p, "--pick", 0, "--size", "100*100"], "--size"),
}


@pytest.mark.parametrize("case", REFINE_ERRORS)
def test_refine_errors_are_one_line_with_exit_2(preview, tmp_path, cache_dir, case):
    arguments, needle = REFINE_ERRORS[case]
    result = wanrt("refine", *arguments(preview[0].folder, tmp_path), "--output", tmp_path / "out.mp4")
    assert_one_line_error(result, needle)
    assert not list(tmp_path.glob("out*"))


def test_preview_errors_are_one_line_with_exit_2(preview, checkpoints, tmp_path, cache_dir):
    common = ["preview", "--task", "tiny-t2v", "--ckpt-dir", checkpoints["tiny-t2v"], "--prompt", PROMPT]
    assert_one_line_error(wanrt(*common, "--size", "40*40", "--out", tmp_path / "a"), "--size")
    assert_one_line_error(wanrt(*common, "--count", 0, "--out", tmp_path / "b"), "--count")
    assert_one_line_error(wanrt(*common, "--out", preview[0].folder), "already holds a preview")
    assert_one_line_error(wanrt(*common, "--expert-per-gpu", "--out", tmp_path / "c"), "--expert-per-gpu",
                          "exactly 2 processes")
    ti2v = ["preview", "--task", "tiny-ti2v", "--ckpt-dir", checkpoints["tiny-ti2v"], "--prompt", PROMPT]
    assert_one_line_error(wanrt(*ti2v, "--expert-per-gpu", "--out", tmp_path / "d"), "--expert-per-gpu")
    assert not any((tmp_path / name).exists() for name in "abcd")
