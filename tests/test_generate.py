"""The generation library: outputs and sidecar, seeds, embedding cache, hashing, failures."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from wanrt import generate as generate_module
from wanrt.pipelines import video as pipeline_module
from wanrt.configs import get_task
from wanrt.errors import InputError
from wanrt.generate import (
    VIDEO_MODEL_TYPES,
    DecodeFailedError,
    EmbeddingCache,
    GenerationRecord,
    check_output_path,
    generate_video,
    generation_task,
    read_latents,
)
from wanrt.hashing import file_sha256
from wanrt.models.dit import WanDiT
from wanrt.pipelines import GenerationRequest, NonFiniteLatentsError, Pipeline
from wanrt.video_io import load_image, read_video

PROMPT = "a red car on the street at night"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


pytestmark = pytest.mark.usefixtures("cache_dir")


def write_gradient_png(path: Path, width: int = 64, height: int = 64) -> Path:
    x = torch.linspace(0, 255, width).expand(height, width)
    y = torch.linspace(0, 255, height)[:, None].expand(height, width)
    pixels = torch.stack([x, y, 255 - x], dim=-1).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return path


def run(checkpoints: dict[str, Path], task: str, output: Path, cache: EmbeddingCache | None = None,
        **request: object) -> GenerationRecord:
    pipeline = Pipeline.from_pretrained(checkpoints[task], task)
    request = GenerationRequest(**{"prompt": PROMPT, "steps": 2, **request})
    return generate_video(pipeline, request, output, embedding_cache=cache)


def saved_latents(record: GenerationRecord) -> torch.Tensor:
    return read_latents(record.latents_path)[0]


@pytest.mark.parametrize("task, with_image", [
    ("tiny-t2v", False), ("tiny-i2v", True), ("tiny-ti2v", False), ("tiny-ti2v", True)])
def test_generation_writes_video_sidecar_and_latents(checkpoints, tmp_path, task, with_image):
    image = load_image(write_gradient_png(tmp_path / "first.png")) if with_image else None
    output = tmp_path / "out" / "video.mp4"
    record = run(checkpoints, task, output, seed=11, guide_scale=(2.0, 4.5), image=image)

    assert (record.video_path, record.sidecar_path, record.latents_path) == (
        output, tmp_path / "out" / "video.json", tmp_path / "out" / "video.latents.safetensors")
    frames, fps = read_video(output)
    spec = get_task(task)
    assert frames.shape[1] == 9 and fps == spec.sample.fps
    sidecar = json.loads(record.sidecar_path.read_text())
    assert sidecar == record.sidecar
    assert sidecar["task"] == task and sidecar["seed"] == 11 and not sidecar["seed_was_random"]
    settings = sidecar["settings"]
    assert (settings["steps"], settings["guide_scale"], settings["frame_num"]) == (2, [2.0, 4.5], 9)
    assert settings["has_image"] is with_image
    assert (sidecar["image"] is not None) is with_image
    assert {"wanrt_version", "torch_version", "python_version"} <= set(sidecar) and sidecar["device"] == "cpu"
    hashes = sidecar["checkpoint"]["sha256"]
    assert spec.vae_checkpoint in hashes and spec.t5_checkpoint in hashes
    assert any(name.endswith(".safetensors") for name in hashes)
    assert all(SHA256_HEX.fullmatch(digest) for digest in hashes.values())
    timings = sidecar["timings_s"]
    assert {"text_encoding", "sampling", "decode", "total", "load"} <= set(timings)
    experts = {"high_noise", "low_noise"} if spec.is_moe else {"only"}
    assert set(timings["sampling"]) <= experts and timings["sampling"]
    assert sidecar["peak_memory"]["host_peak_rss_bytes"] > 0
    assert sidecar["video"]["frames"] == 9 and sidecar["latents"] == str(record.latents_path)
    latents, metadata = read_latents(record.latents_path)
    assert metadata["task"] == task and Path(metadata["ckpt_dir"]) == checkpoints[task].resolve()
    assert latents.shape[:2] == (spec.vae.z_dim, 3)


def test_seed_reproduces_and_a_random_seed_is_recorded(checkpoints, tmp_path):
    drawn = run(checkpoints, "tiny-ti2v", tmp_path / "drawn.mp4", seed=-1)
    seed = drawn.sidecar["seed"]
    assert drawn.sidecar["seed_was_random"] and seed >= 0
    again = run(checkpoints, "tiny-ti2v", tmp_path / "again.mp4", seed=seed)
    other = run(checkpoints, "tiny-ti2v", tmp_path / "other.mp4", seed=seed + 1)
    assert torch.equal(saved_latents(drawn), saved_latents(again))
    assert not torch.allclose(saved_latents(drawn), saved_latents(other))


def test_embedding_cache_hit_skips_t5_and_reproduces(checkpoints, tmp_path, cache_dir, monkeypatch):
    cache = EmbeddingCache()
    assert cache.folder == cache_dir / "embeddings"
    first = run(checkpoints, "tiny-ti2v", tmp_path / "first.mp4", cache)
    assert first.sidecar["runtime"]["embedding_cache"] == "miss"
    assert len(list(cache.folder.glob("*.safetensors"))) == 2  # prompt and negative prompt

    def no_t5(*args, **kwargs):
        raise AssertionError("T5 was loaded despite a cache hit")
    monkeypatch.setattr(pipeline_module, "load_t5", no_t5)
    second = run(checkpoints, "tiny-ti2v", tmp_path / "second.mp4", cache)
    assert second.sidecar["runtime"]["embedding_cache"] == "hit"
    assert "t5" not in second.sidecar["timings_s"]["load"]
    assert torch.equal(saved_latents(first), saved_latents(second))
    pipeline = Pipeline.from_pretrained(checkpoints["tiny-ti2v"], "tiny-ti2v")
    assert cache.get(pipeline, "another prompt") is None


def test_nan_latents_stop_the_run_and_write_nothing(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(WanDiT, "forward", lambda self, x, *args, **kwargs: torch.full_like(x, float("nan")))
    with pytest.raises(NonFiniteLatentsError, match=r"step 1/2"):
        run(checkpoints, "tiny-ti2v", tmp_path / "out" / "video.mp4")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_failed_video_write_keeps_the_latents_and_names_them(checkpoints, tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")
    monkeypatch.setattr(generate_module, "write_video", full_disk)
    output = tmp_path / "video.mp4"
    with pytest.raises(DecodeFailedError) as failure:
        run(checkpoints, "tiny-ti2v", output)
    latents_path = tmp_path / "video.latents.safetensors"
    assert f"wanrt decode {latents_path}" in str(failure.value)
    assert "No space left" in str(failure.value)
    assert latents_path.is_file() and not output.exists() and not (tmp_path / "video.json").exists()


def test_file_sha256_is_memoised_by_path_size_and_mtime(tmp_path, cache_dir):
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"first version")
    assert file_sha256(weights) == hashlib.sha256(b"first version").hexdigest()
    (memo,) = (cache_dir / "sha256").iterdir()
    # A planted digest is returned as is: the file is not read again while unchanged.
    memo.write_text("0" * 64)
    assert file_sha256(weights) == "0" * 64
    weights.write_bytes(b"second, longer version")
    assert file_sha256(weights) == hashlib.sha256(b"second, longer version").hexdigest()


def test_library_validation_names_the_flag(tmp_path):
    with pytest.raises(InputError, match="--output"):
        check_output_path(tmp_path / "video.avi")
    with pytest.raises(InputError, match="--task 't2v-XL' is not available.*tiny-t2v"):
        generation_task("t2v-XL")
    with pytest.raises(InputError, match="--task s2v-14B: wanrt preview runs t2v-A14B.*use wanrt generate"):
        generation_task("s2v-14B", VIDEO_MODEL_TYPES, "wanrt preview")
