"""Hostile inputs and faults (issue 20): each case reproduces a failure found by hand, and
checks it now ends in one line naming the input (exit 2) with nothing lost or let in."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from test_cli import PROMPT, assert_one_line_error, wanrt

from wanrt import limits
from wanrt.errors import InputError
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
