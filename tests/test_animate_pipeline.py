"""The Animate segment loop, its conditioning rules and the CLI (tiny random checkpoint in
the official layout, toy src_root_path folders)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import load_fixture
from typer.testing import CliRunner

from wanrt.cli.app import app
from wanrt.configs import get_task
from wanrt.demo import write_tiny_animate_checkpoint, write_toy_animate_source
from wanrt.errors import InputError
from wanrt.pipelines.animate import (AnimatePipeline, AnimateRequest, i2v_mask, letterbox, padded_length,
                                     ping_pong_indices, read_source)
from wanrt.video_io import read_video, write_video

TASK = get_task("tiny-animate")
runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_animate_checkpoint(tmp_path_factory.mktemp("ckpt") / "Wan2.2-Animate-tiny", TASK)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    # 9 frames in 5-frame segments overlapping by 1: two segments, the second a continuation.
    return write_toy_animate_source(tmp_path_factory.mktemp("src"), TASK, frames=9, size="32*32")


# ---------------------------------------------------------------- official rules


def test_masks_match_the_official_get_i2v_mask():
    tensors, _ = load_fixture("animate/forward")
    assert torch.equal(i2v_mask(1, 8, 12, 1), tensors["mask_ref"])
    assert torch.equal(i2v_mask(2, 8, 12, 0), tensors["msk_reft.animate"])
    assert torch.equal(i2v_mask(2, 8, 12, 1), tensors["msk_reft.continuation"])
    # Replacement: 1 - person mask, nearest-resized per pixel frame, then folded.
    keep = F.interpolate(1 - tensors["mask_video"][0].transpose(0, 1), size=(8, 12), mode="nearest")
    assert torch.equal(keep[:, 0][None], tensors["replace_mask_latent_res"])
    assert torch.equal(i2v_mask(2, 8, 12, 0, pixel_mask=tensors["replace_mask_latent_res"]),
                       tensors["msk_reft.replace"])


def test_segment_padding_is_the_official_one():
    # get_valid_len: 100 frames in 77-frame segments overlapping by 1 -> 153 (two strides of 76 + 1).
    assert padded_length(100, 77, 1) == 153
    assert padded_length(77, 77, 1) == 77
    assert padded_length(82, 77, 5) == 149
    # inputs_padding plays the frames forwards and back.
    assert ping_pong_indices(4, 10) == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    assert ping_pong_indices(3, 3) == [0, 1, 2]


def test_reference_is_letterboxed_as_the_official_padding_resize():
    tall = torch.full((20, 10, 3), 200, dtype=torch.uint8)
    boxed = letterbox(tall, 32, 32)
    # h/w 2 > 1: height fills, width int(32 / 20 * 10) = 16, centred at column (32 - 16) // 2.
    assert (boxed[:, 8:24] == 200).all() and (boxed[:, :8] == 0).all() and (boxed[:, 24:] == 0).all()
    assert torch.equal(letterbox(tall, 20, 10), tall)  # same size: untouched


def test_request_validation():
    with pytest.raises(InputError, match="--refert_num 3 must be 1 or 5"):
        AnimateRequest(refert_num=3).resolved(TASK)
    with pytest.raises(InputError, match="--frame_num 8 must be 4n\\+1"):
        AnimateRequest(clip_len=8).resolved(TASK)
    resolved = AnimateRequest().resolved(get_task("animate-14B"))
    assert (resolved.clip_len, resolved.steps, resolved.shift, resolved.guide_scale) == (77, 20, 5.0, 1.0)
    assert resolved.prompt == "视频中的人在做动作" and get_task("animate-14B").sample.fps == 30


# ---------------------------------------------------------------- the loop


class _Recorder:
    """Wraps the DiT (the pipeline's `wrap_expert` hook) and keeps every call's inputs."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, expert, model):
        def run(x, t, context, y, clip_features, pose_latents, face):
            self.calls.append(dict(context=context.clone(), y=y.clone(), face=face.clone()))
            return model(x, t, context, y, clip_features, pose_latents, face)
        return run


def _run(checkpoint, source, request: AnimateRequest):
    pipeline = AnimatePipeline.from_pretrained(checkpoint, TASK.name, device="cpu")
    recorder = _Recorder()
    pipeline.wrap_expert = recorder
    embeddings = pipeline.encode_text("a person", "")
    video = pipeline.animate(request, read_source(source, request.replace), embeddings)
    return pipeline, recorder, video, embeddings


def test_animation_segments_carry_frames_and_cfg_uses_the_minus_one_face(checkpoint, source):
    request = AnimateRequest(clip_len=5, steps=2, guide_scale=2.0)
    pipeline, recorder, video, embeddings = _run(checkpoint, source, request)
    assert video.shape == (3, 9, 32, 32) and torch.isfinite(video).all()
    # 2 segments x 2 steps x (cond + uncond).
    assert pipeline.dit_forwards == len(recorder.calls) == 8
    first, uncond, second = recorder.calls[0], recorder.calls[1], recorder.calls[4]
    assert torch.equal(uncond["face"], torch.full_like(first["face"], -1.0))
    assert torch.equal(uncond["context"][0], embeddings.uncond) and torch.equal(first["context"][0], embeddings.cond)
    # y = [mask(4) | latents(16)] x [reference frame | lat_t frames]: the reference frame's mask
    # is 1; the first segment's video part is 0 (black video), the second's carries frame 1.
    assert first["y"].shape == (1, 20, 3, 4, 4)
    assert (first["y"][0, :4, 0] == 1).all() and (first["y"][0, :4, 1:] == 0).all()
    assert (second["y"][0, :4, 1] == 1).all() and (second["y"][0, :4, 2] == 0).all()
    assert not torch.equal(first["y"][0, 4:, 1], second["y"][0, 4:, 1])


def test_replacement_conditions_on_the_background_and_inverted_person_mask(checkpoint, source):
    request = AnimateRequest(replace=True, clip_len=5, steps=1)
    pipeline, recorder, video, _ = _run(checkpoint, source, request)
    assert video.shape == (3, 9, 32, 32) and pipeline.dit_forwards == 2  # CFG 1: one forward per step
    mask_video = read_video(source / "src_mask.mp4")[0]
    person = (mask_video[0, :5] * 0.5 + 0.5)  # the first channel / 255, as the official reads it
    keep = F.interpolate((1 - person)[:, None], size=(4, 4), mode="nearest")[:, 0]
    expected = i2v_mask(2, 4, 4, 0, pixel_mask=keep[None])
    assert torch.allclose(recorder.calls[0]["y"][0, :4, 1:], expected, atol=1e-6)
    assert 0 < expected.mean() < 1


def test_relighting_lora_is_merged_from_the_checkpoint_folder(checkpoint):
    pipeline = AnimatePipeline.from_pretrained(checkpoint, TASK.name, device="cpu", use_relighting_lora=True)
    assert [record["patched_parameters"] for record in pipeline.lora_records()] == [60]


def test_source_problems_are_one_line_input_errors(tmp_path, source):
    broken = tmp_path / "src"
    shutil.copytree(source, broken)
    (broken / "src_bg.mp4").unlink()
    with pytest.raises(InputError, match="lacks src_bg.mp4"):
        read_source(broken, replace=True)
    with pytest.raises(InputError, match="not a folder"):
        read_source(tmp_path / "nowhere", replace=False)


# ---------------------------------------------------------------- CLI


def wanrt(*args):
    return runner.invoke(app, [str(arg) for arg in args])


@pytest.mark.parametrize("replace", [False, True], ids=["animate", "replace"])
def test_cli_generates_both_modes(checkpoint, source, tmp_path, replace):
    output = tmp_path / "out.mp4"
    # Replacement with the official relighting flag; animation with the same file as a user --lora.
    flags = ["--replace_flag", "--use_relighting_lora"] if replace else ["--lora", checkpoint / "relighting_lora.ckpt"]
    result = wanrt("generate", "--task", "tiny-animate", "--ckpt_dir", checkpoint, "--src_root_path", source,
                   "--refert_num", 1, "--frame_num", 5, "--sample_steps", 1, "--base_seed", 3, "--save_file",
                   output, *flags)
    assert result.exit_code == 0, result.output
    frames, fps = read_video(output)
    assert frames.shape[1] == 9 and fps == 30
    sidecar = json.loads(output.with_suffix(".json").read_text())
    assert sidecar["settings"]["replace_flag"] is replace and sidecar["seed"] == 3
    assert [lora["patched_parameters"] for lora in sidecar["runtime"]["loras"]] == [60]


@pytest.mark.parametrize("args,needle", [
    (["--refert_num", 3], "--refert_num 3 must be 1 or 5"),
    (["--replace_flag", "--src_root_path", "{empty}"], "lacks src_pose.mp4"),
    (["--use_relighting_lora"], "add --replace_flag"),
    (["--size", "64*64"], "--size does not apply to tiny-animate"),
    (["--sample_guide_scale", "1,2"], "must be one number"),
    (["--lora-high", "{empty}"], "single DiT; use --lora"),
], ids=["refert", "missing-files", "lora-without-replace", "size", "two-scales", "expert-lora"])
def test_cli_bad_inputs_are_one_line(checkpoint, source, tmp_path, args, needle):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [str(empty) if a == "{empty}" else a for a in args]
    base = ["generate", "--task", "tiny-animate", "--ckpt_dir", checkpoint, "--save_file", tmp_path / "o.mp4"]
    if "--src_root_path" not in args:
        base += ["--src_root_path", source]
    result = wanrt(*base, *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert not (tmp_path / "o.mp4").exists()


def test_wrong_face_crop_size_is_refused_before_the_dit_loads(checkpoint, source, tmp_path):
    folder = tmp_path / "src"
    shutil.copytree(source, folder)
    write_video(torch.zeros(3, 9, 16, 16), folder / "src_face.mp4", fps=30)
    pipeline = AnimatePipeline.from_pretrained(checkpoint, TASK.name, device="cpu")
    with pytest.raises(InputError, match="src_face.mp4 frames are 16x16; this model takes 32x32"):
        pipeline.animate(AnimateRequest(clip_len=5), read_source(folder, replace=False))
    assert pipeline.load_seconds == {}  # nothing loaded


def test_animate_flags_on_another_task_are_refused(tmp_path):
    result = wanrt("generate", "--task", "tiny-t2v", "--prompt", "a cat", "--ckpt_dir", tmp_path,
                   "--src_root_path", tmp_path)
    assert result.exit_code == 2 and "--src_root_path only apply to animate tasks" in result.stderr


@pytest.mark.slow
def test_demo_runs_both_modes(tmp_path, monkeypatch):
    monkeypatch.setenv("WANRT_CACHE_DIR", str(tmp_path / "cache"))
    output = tmp_path / "demo.mp4"
    result = wanrt("demo", "--task", "tiny-animate", "--output", output)
    assert result.exit_code == 0, result.output
    for video in (output, tmp_path / "demo-replace.mp4"):
        assert read_video(video)[0].shape[1] == 13
    assert json.loads((tmp_path / "demo-replace.json").read_text())["runtime"]["loras"][0]["patched_parameters"] == 60
