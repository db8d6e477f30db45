"""Hostile inputs and faults (issue 20): each case reproduces a failure found by hand, and
checks it now ends in one line naming the input (exit 2) with nothing lost or let in."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
import zlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import PROMPT, assert_one_line_error, wanrt
from test_distributed import TESTS, torchrun
from test_manifest import IDENTITY, PROFILE, CountingBuilder

from wanrt import limits, video_io
from wanrt.configs import get_task
from wanrt.errors import CheckpointError
from wanrt.engines.base import use_engine
from wanrt.export.manifest import ArtifactBuildError, ArtifactStore, BuiltFiles, TamperedArtifactError, verify
from wanrt.generate import LATENTS_FORMAT, read_latents, save_latents_or_fallback
from wanrt.hashing import file_sha256
from wanrt.loading.checkpoint import load_dit
from wanrt.loading.files import read_safetensors_header
from wanrt.models.tokenizer import PromptTokenizer
from wanrt.pipelines import GenerationRequest, Pipeline
from wanrt.resume import (SamplingCheckpointer, SamplingFailedError, read_sampling_state, resumed_state,
                          sample_with_checkpoints)
from wanrt.video_io import InputTooLargeError, load_image, read_video

pytestmark = pytest.mark.usefixtures("cache_dir")


# ---------------------------------------------------------------------- 1: memory caps


def black_video(path: Path, frames: int, width: int, height: int, container: str = "mp4") -> Path:
    """A few KB that decode to `frames` black frames: what a hostile upload looks like."""
    with av.open(str(path), mode="w", format=container) as output:
        stream = output.add_stream("libx264", rate=24, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        black = np.zeros((height, width, 3), np.uint8)
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(black, format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, 24)
            output.mux(stream.encode(frame))
        output.mux(stream.encode(None))
    return path


def black_png(path: Path, width: int, height: int) -> Path:
    """A valid black PNG of any size: 1-bit greyscale (which `load_image` converts to RGB),
    compressed row by row, never held in memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    compressor, row, compressed = zlib.compressobj(), bytes(1 + (width + 7) // 8), []
    for _ in range(height):
        compressed.append(compressor.compress(row))
    compressed.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(compressed))
                     + chunk(b"IEND", b""))
    return path


def peak_rss_mib_after(calls: list[str]) -> tuple[float, list[tuple[float, str]]]:
    """Run each `wanrt.video_io` call in turn in one fresh process: the peak RSS in MiB
    just after the imports, then per call the peak so far and the error it raised."""
    script = ["import resource", "from pathlib import Path", "from wanrt import video_io",
              "def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024",
              "print(peak())"]
    for call in calls:
        script += ["try:", f"    video_io.{call}", "    print(peak(), 'no error')",
                   "except video_io.InputError as error:", "    print(peak(), ' '.join(str(error).split()))"]
    result = subprocess.run([sys.executable, "-c", "\n".join(script)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    imports, *lines = result.stdout.strip().splitlines()
    return float(imports), [(float(line.split(" ", 1)[0]), line.split(" ", 1)[1]) for line in lines]


# Decoding them would peak at several GB: 600 frames of 512x512 are 1.8 GB as float32,
# 12000x12000 pixels 1.6 GB (5.2 GB RSS measured before the limits).
PEAK_ABOVE_IMPORTS_MIB = 64


def test_hostile_videos_and_images_are_refused_with_bounded_memory(tmp_path):
    # mp4 states its frame count; MPEG-TS only a duration (the count is estimated from it).
    videos = [black_video(tmp_path / f"long.{kind}", 600, 512, 512, kind) for kind in ("mp4", "mpegts")]
    image = black_png(tmp_path / "bomb.png", 12000, 12000)
    assert all(path.stat().st_size < 250_000 for path in videos) and image.stat().st_size < 1_000_000
    imports, results = peak_rss_mib_after([f"read_video(Path({str(path)!r}))" for path in videos]
                                          + [f"load_image(Path({str(image)!r}))"])
    for peak, message in results:
        assert peak - imports < PEAK_ABOVE_IMPORTS_MIB, (peak, imports, message)
    assert [message for _, message in results[:2]] == [
        f"video {path} has more than 481 frames, the most wanrt reads; trim or downscale it first "
        "(e.g. with ffmpeg)" for path in videos]
    assert "12000x12000" in results[2][1] and str(limits.MAX_IMAGE_PIXELS) in results[2][1]
    assert load_image(black_png(tmp_path / "small.png", 40, 30)).shape == (3, 30, 40)


def test_video_without_frame_count_or_duration_is_stopped_while_decoding(tmp_path):
    # A raw H.264 stream states neither: the decode loop stops at the limit.
    path = black_video(tmp_path / "raw.h264", 40, 64, 64, "h264")
    with pytest.raises(InputTooLargeError, match="more than 30 frames"):
        read_video(path, max_frames=30)
    video, fps = read_video(path, max_frames=40)
    assert video.shape == (3, 40, 64, 64)


def test_video_frame_pixels_and_total_pixels_are_capped(tmp_path, monkeypatch):
    path = black_video(tmp_path / "clip.mp4", 10, 64, 48)
    monkeypatch.setattr("wanrt.video_io.MAX_VIDEO_FRAME_PIXELS", 64 * 48 - 1)
    with pytest.raises(InputTooLargeError, match="64x48 frames"):
        read_video(path)
    monkeypatch.setattr("wanrt.video_io.MAX_VIDEO_FRAME_PIXELS", 64 * 48)
    monkeypatch.setattr("wanrt.video_io.MAX_VIDEO_TOTAL_PIXELS", 9 * 64 * 48)
    with pytest.raises(InputTooLargeError, match="pixels in all"):
        read_video(path)


def test_refine_with_a_huge_init_video_is_one_line(checkpoints, tmp_path):
    path = black_video(tmp_path / "long.mp4", 500, 32, 32)
    result = wanrt("refine", "--init-video", path, "--task", "tiny-t2v", "--ckpt-dir", checkpoints["tiny-t2v"],
                   "--prompt", PROMPT, "--output", tmp_path / "out.mp4")
    assert_one_line_error(result, "--init-video", "481 frames")
    assert not (tmp_path / "out.mp4").exists()


# ---------------------------------------------------------------------- 2, 6: checkpoint files


@pytest.fixture
def dit_folder(checkpoints, tmp_path) -> Path:
    """A private copy of a tiny sharded DiT expert (three shards and an index)."""
    folder = tmp_path / "dit"
    shutil.copytree(checkpoints["tiny-t2v"] / "high_noise_model", folder)
    return folder


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


INDEX = "diffusion_pytorch_model.safetensors.index.json"
FIRST_SHARD = "diffusion_pytorch_model-00001-of-00003.safetensors"


@pytest.mark.parametrize("entry", ["absolute", "dotdot", "symlink"])
def test_index_shard_outside_the_folder_is_refused(dit_folder, tmp_path, entry):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(dit_folder / FIRST_SHARD, outside / FIRST_SHARD)  # a valid shard, just elsewhere
    names = {"absolute": str(outside / FIRST_SHARD), "dotdot": f"../elsewhere/{FIRST_SHARD}",
             "symlink": FIRST_SHARD}
    if entry == "symlink":
        (dit_folder / FIRST_SHARD).symlink_to(outside / FIRST_SHARD)

    def point_outside(index):
        index["weight_map"] = {key: names[entry] if name == FIRST_SHARD else name
                               for key, name in index["weight_map"].items()}
    edit_json(dit_folder / INDEX, point_outside)
    with pytest.raises(CheckpointError, match="points outside"):
        load_dit(dit_folder, expect=get_task("tiny-t2v").dit)


def test_key_in_two_shards_is_refused_naming_both(dit_folder):
    first = dit_folder / FIRST_SHARD
    second = dit_folder / "diffusion_pytorch_model-00002-of-00003.safetensors"
    stolen = load_file(str(first))
    save_file({**load_file(str(second)), "patch_embedding.bias": stolen["patch_embedding.bias"]}, str(second))
    with pytest.raises(CheckpointError, match="'patch_embedding.bias' is in both") as error:
        load_dit(dit_folder)
    assert str(first) in str(error.value) and str(second) in str(error.value)


def raw_safetensors(path: Path, header: bytes | object, data: bytes = bytes(64)) -> Path:
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def entry(begin: int, end: int, shape=(4,), dtype="F32") -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


MALFORMED_HEADERS = {
    "overlapping-offsets": ({"a": entry(0, 16), "b": entry(8, 24)}, "overlap"),
    "offsets-short-of-shape": ({"a": entry(0, 8, shape=(4,))}, "do not hold shape"),
    "list-header": ([1, 2, 3], "not a JSON object"),
    "missing-data-offsets": ({"a": {"dtype": "F32", "shape": [4]}}, "no dtype, shape and data_offsets"),
    "deep-json": (b"[" * 100_000 + b"]" * 100_000, "corrupt safetensors header"),
    "string-shape": ({"a": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}}, "bad shape"),
    "unknown-dtype": ({"a": entry(0, 16, dtype="F128")}, "unsupported safetensors dtype"),
}


@pytest.mark.parametrize("case", MALFORMED_HEADERS)
def test_malformed_safetensors_header_is_a_checkpoint_error(tmp_path, case):
    header, needle = MALFORMED_HEADERS[case]
    path = raw_safetensors(tmp_path / "bad.safetensors", header)
    with pytest.raises(CheckpointError, match=needle) as error:
        read_safetensors_header(path)
    assert str(path) in str(error.value)


MALFORMED_CONFIGS = {
    "num-heads-zero": ("num_heads", 0, "num_heads 0 must be a positive integer"),
    "dim-a-string": ("dim", "64", "dim '64' must be a positive integer"),
    "eps-a-string": ("eps", "x", "eps 'x' must be a small positive number"),
    "model-type-unknown": ("model_type", "t3v", "model_type 't3v' is unknown"),
    "layers-bool": ("num_layers", True, "num_layers True must be a positive integer"),
}


@pytest.mark.parametrize("case", MALFORMED_CONFIGS)
def test_malformed_config_values_are_checkpoint_errors(dit_folder, case):
    key, value, needle = MALFORMED_CONFIGS[case]
    edit_json(dit_folder / "config.json", lambda config: config.update({key: value}))
    with pytest.raises(CheckpointError, match=re.escape(needle)):
        load_dit(dit_folder)


@pytest.mark.parametrize("content", ["[]", '{"weight_map": ["a"]}', '{"weight_map": {"k": 3}}'])
def test_non_dict_index_is_a_checkpoint_error(dit_folder, content):
    (dit_folder / INDEX).write_text(content)
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        load_dit(dit_folder)


def private_checkpoint(checkpoints, tmp_path, task: str = "tiny-t2v") -> Path:
    root = tmp_path / task
    shutil.copytree(checkpoints[task], root, symlinks=True)
    return root


@pytest.fixture
def no_text_encoder(monkeypatch):
    """Fail the test if T5 is loaded: the checks it guards must come before."""
    def refuse(*args, **kwargs):
        raise AssertionError("T5 was loaded before the check")
    monkeypatch.setattr("wanrt.pipelines.video.load_t5", refuse)


def break_low_noise_config(root: Path) -> None:
    edit_json(root / "low_noise_model" / "config.json", lambda config: config.update(num_heads=0))


def git_lfs_pointer(path: Path) -> None:
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def wan22_vae(path: Path, checkpoints) -> None:
    shutil.copy(checkpoints["tiny-ti2v"] / "Wan2.2_VAE.pth", path)


# (what is broken, the one line's needles): found before T5 and before step 1.
BROKEN_COMPONENTS = {
    "low-noise-expert-config": (lambda root, ckpts: break_low_noise_config(root), ("num_heads 0", "low_noise")),
    "vae-lfs-pointer": (lambda root, ckpts: git_lfs_pointer(root / "Wan2.1_VAE.pth"), ("git-lfs pointer",)),
    "vae-truncated": (lambda root, ckpts: truncate(root / "Wan2.1_VAE.pth"), ("truncated",)),
    "vae-48-channels": (lambda root, ckpts: wan22_vae(root / "Wan2.1_VAE.pth", ckpts), ("48 latent channels",)),
    "t5-truncated": (lambda root, ckpts: truncate(root / "models_t5_umt5-xxl-enc-bf16.pth"), ("truncated",)),
    "tokenizer-missing": (lambda root, ckpts: (root / "google/umt5-xxl/tokenizer.json").unlink(),
                          ("tokenizer.json",)),
}


@pytest.mark.parametrize("case", BROKEN_COMPONENTS)
def test_every_component_is_checked_before_t5_and_sampling(checkpoints, tmp_path, no_text_encoder, case):
    root = private_checkpoint(checkpoints, tmp_path)
    break_it, needles = BROKEN_COMPONENTS[case]
    break_it(root, checkpoints)
    result = wanrt("generate", "--task", "tiny-t2v", "--ckpt-dir", root, "--prompt", PROMPT, "--steps", 2,
                   "--output", tmp_path / "out.mp4", "--no-embedding-cache")
    assert_one_line_error(result, *needles)
    assert not list(tmp_path.glob("out*"))


# ---------------------------------------------------------------------- 4, 5: values checked up front


EARLY_VALUE_CASES = {
    "prompt-invalid-utf8": (["--prompt", "\udcff\udcfe"], "--prompt"),
    "negative-prompt-invalid-utf8": (["--negative-prompt", "ok \udcff"], "--negative-prompt"),
    "prompt-too-long": (["--prompt", "dog " * 6000], "--prompt"),
    "guide-scale-nan": (["--guide-scale", "nan"], "--guide-scale"),
    "guide-scale-inf": (["--guide-scale", "3,inf"], "--guide-scale"),
    "shift-nan": (["--shift", "nan"], "--shift"),
    "shift-inf": (["--shift", "inf"], "--shift"),
    "shift-zero": (["--shift", "0"], "--shift"),
    "shift-negative": (["--shift", "-2"], "--shift"),
    "frame-num-huge": (["--frame-num", 400001], "--frame-num"),
}


@pytest.mark.parametrize("case", EARLY_VALUE_CASES)
def test_bad_values_fail_before_anything_loads(checkpoints, tmp_path, no_text_encoder, monkeypatch, case):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the check")
    monkeypatch.setattr("wanrt.pipelines.video.load_dit", no_load)
    extra, flag = EARLY_VALUE_CASES[case]
    result = wanrt("generate", "--task", "tiny-t2v", "--ckpt-dir", checkpoints["tiny-t2v"], "--prompt", PROMPT,
                   "--output", tmp_path / "out.mp4", *extra)
    assert_one_line_error(result, flag)
    assert not list(tmp_path.glob("out*"))


# ---------------------------------------------------------------------- 3: tokenizer


def test_missing_tokenizer_json_is_refused_not_a_video_from_an_ignored_prompt(checkpoints, tmp_path):
    root = private_checkpoint(checkpoints, tmp_path)
    (root / "google/umt5-xxl/tokenizer.json").unlink()
    result = wanrt("generate", "--task", "tiny-t2v", "--ckpt-dir", root, "--prompt", PROMPT, "--steps", 2,
                   "--output", tmp_path / "out.mp4", "--no-embedding-cache")
    assert_one_line_error(result, "tokenizer.json", after_phase_lines=True)
    assert not list(tmp_path.glob("out*"))


def test_tokenizer_vocab_must_fit_the_encoder_embedding(checkpoints):
    folder = checkpoints["tiny-t2v"] / "google/umt5-xxl"
    assert len(PromptTokenizer.from_folder(folder, vocab_size=256).hf_tokenizer) == 66
    with pytest.raises(CheckpointError, match="66 tokens but the text encoder embeds 64"):
        PromptTokenizer.from_folder(folder, vocab_size=64)
    with pytest.raises(CheckpointError, match="66 tokens but the text encoder embeds 256384"):
        PromptTokenizer.from_folder(folder, vocab_size=256384)


def test_latents_go_to_the_cache_when_the_output_disk_is_full(checkpoints, tmp_path, cache_dir, monkeypatch,
                                                              caplog):
    out = tmp_path / "out"
    real_save_file = save_file

    def full_output_disk(tensors, filename, metadata=None):
        if Path(filename).parent == out:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save_file(tensors, filename, metadata=metadata)
    monkeypatch.setattr("wanrt.generate.save_file", full_output_disk)
    result = wanrt("generate", "--task", "tiny-t2v", "--ckpt-dir", checkpoints["tiny-t2v"], "--prompt", PROMPT,
                   "--steps", 2, "--frame-num", 5, "--output", out / "video.mp4")
    assert result.exit_code == 0, result.output
    fallback = cache_dir / "latents" / "video.latents.safetensors"
    # Logged on stderr (Python's last-resort handler prints the message alone).
    assert caplog.messages == [
        f"could not save the latents to {out / 'video.latents.safetensors'} (No space left on device)",
        f"saved the latents to {fallback} instead"]
    assert f"latents: {fallback}" in result.stdout
    assert read_latents(fallback)[0].shape[0] == 16
    assert json.loads((out / "video.json").read_text())["latents"] == str(fallback)
    assert sorted(path.name for path in out.iterdir()) == ["video.json", "video.mp4"]


def test_latents_kept_in_memory_when_no_disk_takes_them(tmp_path, cache_dir, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr("wanrt.generate.save_file", no_space)
    saved = save_latents_or_fallback(tmp_path / "v.latents.safetensors", torch.zeros(4, 1, 2, 2), "tiny-t2v",
                                     tmp_path, {})
    assert saved is None and [path for path in tmp_path.rglob("*") if path.is_file()] == []


# ---------------------------------------------------------------------- 13: memory budgets


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-4"])
@pytest.mark.parametrize("flag", ["--ram", "--vram"])
def test_memory_budget_must_be_positive_and_finite(checkpoints, tmp_path, flag, value):
    generate = wanrt("generate", "--task", "tiny-t2v", "--ckpt-dir", checkpoints["tiny-t2v"], "--prompt", PROMPT,
                     "--device", "cpu", "--output", tmp_path / "out.mp4", flag, value)
    assert_one_line_error(generate, f"{flag} {float(value)} must be a positive number of GiB")
    assert_one_line_error(wanrt("plan", "--task", "t2v-A14B", flag, value), flag)


# ---------------------------------------------------------------------- 11, 12: provenance, outputs


def test_in_place_edit_with_the_mtime_set_back_is_hashed_again(tmp_path, cache_dir):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 1000)
    before = path.stat()
    assert file_sha256(path) == hashlib.sha256(b"a" * 1000).hexdigest()
    with open(path, "r+b") as handle:  # same size, same inode
        handle.write(b"b")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert file_sha256(path) == hashlib.sha256(b"b" + b"a" * 999).hexdigest()


def fake_latents(path: Path, sidecar: str) -> Path:
    save_file({"latents": torch.zeros(16, 3, 8, 8)}, str(path),
              metadata={"format": LATENTS_FORMAT, "task": "tiny-t2v", "ckpt_dir": "/nowhere", "sidecar": sidecar})
    return path


@pytest.mark.parametrize("sidecar", ["not json", "[1, 2]", '{"timings_s": 3}'])
def test_decode_refuses_a_sidecar_that_is_not_a_json_object(tmp_path, sidecar):
    path = fake_latents(tmp_path / "run.latents.safetensors", sidecar)
    assert_one_line_error(wanrt("decode", path), str(path), "not a JSON object")


def test_unrelated_json_beside_the_output_is_never_replaced(checkpoints, tmp_path):
    mine = tmp_path / "out.json"
    mine.write_text('{"my": "notes"}')
    result = wanrt("generate", "--task", "tiny-t2v", "--ckpt-dir", checkpoints["tiny-t2v"], "--prompt", PROMPT,
                   "--output", tmp_path / "out.mp4")
    assert_one_line_error(result, str(mine), "not a wanrt sidecar")
    assert mine.read_text() == '{"my": "notes"}'


def test_decode_writes_a_new_file_and_marks_the_copied_record(checkpoints, tmp_path):
    run = tmp_path / "run.mp4"
    generated = wanrt("generate", "--task", "tiny-t2v", "--ckpt-dir", checkpoints["tiny-t2v"], "--prompt", PROMPT,
                      "--steps", 2, "--frame-num", 5, "--output", run)
    assert generated.exit_code == 0, generated.output
    latents = tmp_path / "run.latents.safetensors"
    # Every output gets the permissions a plain open() gives (umask applied), latents too.
    assert len({stat.S_IMODE(path.stat().st_mode) for path in (run, run.with_suffix(".json"), latents)}) == 1
    originals = {path: path.read_bytes() for path in (run, run.with_suffix(".json"))}
    decoded = wanrt("decode", latents)
    assert decoded.exit_code == 0, decoded.output
    assert f"video:   {tmp_path / 'run_decoded.mp4'}" in decoded.stdout
    assert all(path.read_bytes() == content for path, content in originals.items())
    record = json.loads((tmp_path / "run_decoded.json").read_text())["decode_run"]["sampling_record"]
    assert record == {"copied_from": str(latents), "latents_sha256": file_sha256(latents), "verified": False}


def test_refine_from_an_index_pointing_outside_the_preview_is_refused(tmp_path):
    folder, outside = tmp_path / "preview", black_video(tmp_path / "elsewhere.mp4", 9, 32, 32)
    folder.mkdir()
    candidate = {"index": 0, "seed": 1, "video": "../elsewhere.mp4", "sidecar": "c.json", "latents": None}
    (folder / "index.json").write_text(json.dumps({
        "format": "wanrt-preview/1", "task": "tiny-t2v", "ckpt_dir": "/nowhere", "settings": {}, "base_seed": 1,
        "seed_was_random": False, "image_path": None, "world_size": 1, "candidates": [candidate]}))
    result = wanrt("refine", "--from", folder, "--pick", 0)
    assert_one_line_error(result, "'../elsewhere.mp4' points outside", str(folder))
    assert outside.is_file()


# ---------------------------------------------------------------------- 9, 10: interrupts, resume


RESUME_STEPS = 4  # tiny-t2v: high, high, high | low (the MoE boundary before step 3)


@pytest.fixture(scope="module")
def tiny_run(checkpoints):
    """A tiny-t2v pipeline, a request crossing the MoE boundary, its embeddings and the
    final latents of an uninterrupted run."""
    pipeline = Pipeline.from_pretrained(checkpoints["tiny-t2v"], "tiny-t2v", device="cpu")
    request = GenerationRequest(prompt=PROMPT, steps=RESUME_STEPS, frame_num=5, seed=11).resolved(pipeline.task)
    embeddings = pipeline.encode_text(request.prompt, request.negative_prompt)
    reference = pipeline.denoise(pipeline.start(request), embeddings).latents[0]
    return pipeline, request, embeddings, reference


def test_sampling_checkpoint_at_the_boundary_and_every_interval(tiny_run, tmp_path):
    pipeline, request, embeddings, reference = tiny_run
    path = tmp_path / "run.sampling.safetensors"
    at_boundary = SamplingCheckpointer(path, pipeline, request, embeddings, tmp_path / "run.mp4", interval_s=1e9)
    final = sample_with_checkpoints(pipeline, pipeline.start(request), embeddings, at_boundary)
    assert torch.equal(final, reference)  # the hook changes nothing
    assert at_boundary.written_step == 3 and read_sampling_state(path).step == 3
    ticks = iter(range(100))
    every_step = SamplingCheckpointer(path, pipeline, request, embeddings, tmp_path / "run.mp4", interval_s=1,
                                      clock=lambda: next(ticks))
    sample_with_checkpoints(pipeline, pipeline.start(request), embeddings, every_step)
    assert every_step.written_step == RESUME_STEPS


def test_a_failure_at_step_k_resumes_bit_identically(tiny_run, tmp_path):
    pipeline, request, embeddings, reference = tiny_run
    path = tmp_path / "run.sampling.safetensors"
    checkpointer = SamplingCheckpointer(path, pipeline, request, embeddings, tmp_path / "run.mp4", interval_s=1e9)

    def out_of_memory_at_the_last_step(info):
        if info.index == RESUME_STEPS - 1:
            raise RuntimeError("CUDA out of memory (simulated)")
    with pytest.raises(SamplingFailedError, match=f"after step 3/4 is saved, continue with: "
                                                  f"wanrt generate --resume {re.escape(str(path))}"):
        sample_with_checkpoints(pipeline, pipeline.start(request), embeddings, checkpointer,
                                on_step=out_of_memory_at_the_last_step)
    saved = read_sampling_state(path)
    assert saved.request == dataclasses.replace(request, image=None) and saved.step == 3
    fresh = Pipeline.from_pretrained(pipeline.files.root, "tiny-t2v", device="cpu")
    resumed = fresh.denoise(resumed_state(fresh, saved), saved.embeddings).latents[0]
    assert torch.equal(resumed, reference)


def test_sigint_keeps_the_state_and_sigterm_during_the_mux_leaves_no_temporary(tiny_run, checkpoints, tmp_path,
                                                                                monkeypatch):
    *_, reference = tiny_run
    folder = tmp_path / "out"
    output, state_file = folder / "run.mp4", folder / "run.sampling.safetensors"

    def ctrl_c_at_step_2(self, info):
        if info.index == 2:
            os.kill(os.getpid(), signal.SIGINT)
    with monkeypatch.context() as patch:
        patch.setattr("wanrt.cli.display.RunDisplay.on_step", ctrl_c_at_step_2)
        interrupted = wanrt("generate", "--task", "tiny-t2v", "--ckpt-dir", checkpoints["tiny-t2v"], "--prompt",
                            PROMPT, "--steps", RESUME_STEPS, "--frame-num", 5, "--seed", 11, "--output", output)
    assert interrupted.exit_code == 130, interrupted.output
    assert interrupted.stderr.strip().splitlines()[-1] == (
        f"interrupted (SIGINT): the sampling state after step 2/4 is saved, continue with: "
        f"wanrt generate --resume {state_file}")
    assert sorted(path.name for path in folder.iterdir()) == [state_file.name]

    # The resumed run is stopped in turn while its mp4 is being verified (after the mux).
    real_count = video_io._count_decoded_frames

    def sigterm_then_count(path):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_count(path)
    monkeypatch.setattr("wanrt.video_io._count_decoded_frames", sigterm_then_count)
    monkeypatch.setattr("wanrt.cli.generate.load_image_option", None)  # --resume reads no option
    resumed = wanrt("generate", "--resume", state_file)
    latents_file = folder / "run.latents.safetensors"
    assert resumed.exit_code == 143, resumed.output
    assert resumed.stderr.strip().splitlines()[-1] == (
        f"interrupted (SIGTERM): the sampled latents are saved, finish with: wanrt decode {latents_file}")
    assert sorted(path.name for path in folder.iterdir()) == [latents_file.name]  # no hidden .tmp.mp4
    latents, metadata = read_latents(latents_file)
    assert torch.equal(latents, reference)
    assert json.loads(metadata["sidecar"])["resumed_from"] == {"path": str(state_file), "step": 2}


def test_resume_refuses_options_that_would_change_the_run(tmp_path):
    result = wanrt("generate", "--resume", tmp_path / "run.sampling.safetensors", "--steps", 8, "--prompt", "x")
    assert_one_line_error(result, "--resume", "drop --prompt, --steps")
    assert_one_line_error(wanrt("generate", "--resume", tmp_path / "missing.sampling.safetensors"),
                          "--resume", "does not exist")


# ---------------------------------------------------------------------- 8: engine cache


def test_engine_build_refused_when_the_disk_is_too_small(tmp_path, monkeypatch):
    store, builder = ArtifactStore(tmp_path), CountingBuilder()
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(ArtifactBuildError, match="needs about .* GiB in .* but .* GiB are free"):
        store.get(IDENTITY, PROFILE, builder, expected_bytes=free + 2**40)
    assert builder.calls == 0 and not list(tmp_path.glob(".build-*"))


def test_disk_full_during_a_build_is_one_line_and_leaves_no_temporary(tmp_path):
    def full_disk(folder: Path) -> BuiltFiles:
        (folder / "model.bin").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(ArtifactBuildError, match="ran out of disk space"):
        ArtifactStore(tmp_path).get(IDENTITY, PROFILE, full_disk)
    assert not list(tmp_path.glob(".build-*"))


def test_folders_of_killed_builds_are_swept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    killed = [tmp_path / f".build-{dead}-abc", tmp_path / ".build-xyz"]  # a killed build, an old-style name
    running = tmp_path / f".build-{os.getpid()}-def"
    for folder in (*killed, running):
        folder.mkdir()
    (killed[0] / "model.bin").write_bytes(b"half")
    ArtifactStore(tmp_path).get(IDENTITY, PROFILE, CountingBuilder())
    assert not any(folder.exists() for folder in killed) and running.is_dir()


@pytest.mark.parametrize("edit", ["empty-files-map", "unlisted-file"])
def test_manifest_must_list_every_file(tmp_path, edit):
    directory, _ = ArtifactStore(tmp_path).get(IDENTITY, PROFILE, CountingBuilder())
    if edit == "empty-files-map":
        edit_json(directory / "manifest.json", lambda manifest: manifest.update(files={}))
        (directory / "model.bin").write_bytes(b"swapped code")
    else:
        (directory / "extra.so").write_bytes(b"injected")
    with pytest.raises(TamperedArtifactError, match="lists no file" if edit == "empty-files-map" else "extra.so"):
        verify(directory, IDENTITY)


@pytest.mark.parametrize("value", ["0", "nan", "-1"])
def test_engine_cache_gib_must_be_positive(checkpoints, tmp_path, value):
    result = wanrt("generate", "--task", "tiny-t2v", "--ckpt-dir", checkpoints["tiny-t2v"], "--prompt", PROMPT,
                   "--device", "cpu", "--output", tmp_path / "out.mp4", "--engine-cache-gib", value)
    assert_one_line_error(result, "--engine-cache-gib")


def test_engine_cache_gib_sets_the_lru_budget(checkpoints):
    pipeline = Pipeline.from_pretrained(checkpoints["tiny-t2v"], "tiny-t2v", device="cpu")
    engine = use_engine(pipeline, "aoti", cache_gib=0.5)
    assert engine.store.max_bytes == 2**29


# ---------------------------------------------------------------------- 7: distributed


@pytest.mark.parametrize("how", ["kill", "freeze"])
def test_a_rank_that_dies_or_freezes_is_named_by_rank0(tmp_path, how):
    started = time.monotonic()
    # --monitor-interval: the launcher would otherwise stop rank 0 before it reports.
    done = torchrun("--monitor-interval", "5", "--log-dir", str(tmp_path), "--redirects", "3",
                    str(TESTS / "distributed_silent_failure_worker.py"), how,
                    env={"WANRT_HEARTBEAT_TIMEOUT_S": "3"})
    elapsed = time.monotonic() - started
    assert done.returncode != 0
    assert elapsed < 60, f"the ranks took {elapsed:.0f} s to stop"
    rank0_stderr = next(tmp_path.rglob("attempt_0/0/stderr.log")).read_text()
    expected = ("error: rank 1: died: its process" if how == "kill" else
                "error: rank 1: stopped responding: no heartbeat for 3 s")
    assert expected in rank0_stderr, rank0_stderr
    assert "Connection reset" not in rank0_stderr
