"""Video/image IO: official uint8 conversion, lossy round trip, atomic writes and one-line input errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wanrt import video_io
from wanrt.errors import InputError
from wanrt.video_io import (
    NonFiniteError,
    OutputWriteError,
    frames_to_uint8,
    load_image,
    read_video,
    write_image,
    write_video,
)

FPS = 16
# H.264 at crf 18 with yuv420p (limited-range 8-bit, half-resolution chroma) on smooth
# gradients: measured mean |error| 0.020 and max 0.133 in [-1, 1] units; crf 0 still gives
# 0.018 mean, so almost all of it is the colour conversion, not the codec.
MEAN_ABS_TOLERANCE = 0.03
MAX_ABS_TOLERANCE = 0.2


def smooth_video(frames: int = 9, height: int = 32, width: int = 48) -> torch.Tensor:
    """[3, T, H, W] in [-1, 1]: a different gradient per channel, drifting over time."""
    t = torch.linspace(0, 1, frames)[:, None, None]
    y = torch.linspace(-1, 1, height)[None, :, None]
    x = torch.linspace(-1, 1, width)[None, None, :]
    shape = (frames, height, width)
    channels = [0.8 * x + 0.1 * t, 0.7 * y - 0.2 * t, 0.5 * x * y + 0.3 * t - 0.2]
    return torch.stack([c.expand(shape) for c in channels]).clamp(-1, 1)


def folder_listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_uint8_conversion_matches_official_truncation():
    values = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 0.999, 1.0, 3.0])
    # clamp, (x + 1) / 2, * 255, truncating cast: 0 -> 127.5 -> 127, 0.999 -> 254.87 -> 254.
    expected = torch.tensor([0, 0, 63, 127, 191, 254, 255, 255], dtype=torch.uint8)
    assert torch.equal(frames_to_uint8(values), expected)
    # bfloat16 input is computed in float32, like the official (float32) VAE output.
    assert torch.equal(frames_to_uint8(values.bfloat16()), frames_to_uint8(values.bfloat16().float()))


def test_video_round_trip(tmp_path):
    video = smooth_video()
    path = tmp_path / "out.mp4"
    info = write_video(video, path, FPS)
    assert (info.path, info.frames, info.width, info.height, info.fps, info.codec) == (path, 9, 48, 32, FPS, "h264")
    assert folder_listing(tmp_path) == ["out.mp4"]

    decoded, fps = read_video(path)
    assert decoded.shape == video.shape and decoded.dtype == torch.float32
    assert fps == FPS
    error = (decoded - video).abs()
    assert error.mean() < MEAN_ABS_TOLERANCE
    assert error.max() < MAX_ABS_TOLERANCE


def test_failed_verification_leaves_nothing_and_keeps_existing_file(tmp_path, monkeypatch):
    path = tmp_path / "out.mp4"
    path.write_bytes(b"previous result")
    monkeypatch.setattr(video_io, "_count_decoded_frames", lambda _: (3, (48, 32)))
    with pytest.raises(OutputWriteError, match="decodes to 3 frames"):
        write_video(smooth_video(), path, FPS)
    assert path.read_bytes() == b"previous result"
    assert folder_listing(tmp_path) == ["out.mp4"]


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    def interrupt(_):
        raise KeyboardInterrupt

    monkeypatch.setattr(video_io, "_count_decoded_frames", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_video(smooth_video(), tmp_path / "out.mp4", FPS)
    assert folder_listing(tmp_path) == []


def test_non_finite_frames_are_refused(tmp_path):
    video = smooth_video()
    video[1, 4, 3, 5] = float("nan")
    video[0, 6, 0, 0] = float("inf")
    path = tmp_path / "out.mp4"
    with pytest.raises(NonFiniteError, match=r"frame 4 \(and 1 more\) of 9"):
        write_video(video, path, FPS)
    with pytest.raises(NonFiniteError, match="frame 0 of 1"):
        write_image(video[:, 4], tmp_path / "first.png")
    assert folder_listing(tmp_path) == []


def test_odd_size_is_refused(tmp_path):
    with pytest.raises(InputError, match="odd side"):
        write_video(smooth_video(height=31), tmp_path / "out.mp4", FPS)
    assert folder_listing(tmp_path) == []


def test_load_image_exact_values(tmp_path):
    pixels = np.array([[[255, 0, 128], [1, 254, 64]]], dtype=np.uint8)  # 1x2 RGB
    path = tmp_path / "in.png"
    path.write_bytes(png_bytes(pixels))
    image = load_image(path)
    assert image.shape == (3, 1, 2) and image.dtype == torch.float32
    assert image[0, 0, 0] == 1.0 and image[1, 0, 0] == -1.0
    assert abs(image[2, 0, 0].item() - (128 / 255 * 2 - 1)) < 1e-6
    expected = torch.from_numpy(pixels).permute(2, 0, 1).double() / 255 * 2 - 1
    assert (image.double() - expected).abs().max() < 1e-6


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_load_image_rejects_truncated_file(tmp_path, image_format):
    gradient = np.linspace(0, 255, 64 * 64 * 3).astype(np.uint8).reshape(64, 64, 3)
    buffer = io.BytesIO()
    Image.fromarray(gradient).save(buffer, format=image_format)
    path = tmp_path / f"cut.{image_format.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(InputError, match=f"cannot decode image {path}") as raised:
        load_image(path)
    assert "\n" not in str(raised.value)


def test_load_image_rejects_missing_path_and_directory(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_image(tmp_path / "absent.png")
    with pytest.raises(InputError, match="is not a file"):
        load_image(tmp_path)


def test_read_video_rejects_missing_and_corrupt_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_video(tmp_path / "absent.mp4")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    with pytest.raises(InputError, match=f"cannot decode video {corrupt}") as raised:
        read_video(corrupt)
    assert "\n" not in str(raised.value)


def test_write_image_round_trip_uses_video_conversion(tmp_path):
    frame = smooth_video()[:, 0]
    path = tmp_path / "first.png"
    write_image(frame, path)
    assert folder_listing(tmp_path) == ["first.png"]
    with Image.open(path) as written:
        stored = torch.from_numpy(np.array(written.convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(stored, frames_to_uint8(frame))
