"""Video and image files in and out of `wanrt generate`.

Pixel tensors are float in [-1, 1], channels first: videos `[3, T, H, W]` (what the VAE
decodes), images `[3, H, W]`. The float <-> uint8 conversions reproduce the official code
bit for bit: `save_video` (clamp, torchvision `make_grid` normalisation, truncating cast) and
the i2v image path (`TF.to_tensor(img).sub_(0.5).div_(0.5)`).

Outputs are written atomically: to a unique hidden temporary file in the destination
folder, verified by reading it back, then `os.replace`d onto the destination. A failed or
interrupted write leaves no temporary file behind and any earlier file at the destination
untouched.
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from wanrt.audio import AudioTrack
from wanrt.errors import InputError, WanrtError
from wanrt.limits import (MAX_FRAMES, MAX_IMAGE_PIXELS, MAX_VIDEO_FRAME_PIXELS, MAX_VIDEO_SECONDS,
                          MAX_VIDEO_TOTAL_PIXELS)

VIDEO_CODEC = "h264"
_ENCODER = "libx264"
_PIXEL_FORMAT = "yuv420p"
_MAX_CRF = 51  # libx264's range for 8-bit video

# What PIL raises on files it cannot identify or decode: OSError covers unidentified and
# truncated files; broken PNG chunks raise SyntaxError, some malformed headers ValueError.
_PIL_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class NonFiniteError(WanrtError, ValueError):
    """Frames to be written contain NaN or Inf (a diverged generation); nothing is written."""


class InputTooLargeError(InputError):
    """A video or image is beyond wanrt.limits; refused before (or while) decoding it."""


class OutputWriteError(WanrtError):
    """An output file could not be written, or failed verification after writing."""


@dataclass(frozen=True)
class VideoInfo:
    """What `write_video` wrote, as verified by decoding the file again."""

    path: Path
    frames: int
    width: int
    height: int
    fps: int
    codec: str


def frames_to_uint8(frames: Tensor) -> Tensor:
    """Float pixels in [-1, 1] (any shape) -> uint8 in [0, 255] on the CPU, as the official `save_video`.

    That is `clamp(-1, 1)`, then `make_grid(normalize=True, value_range=(-1, 1))`, which for
    a single video is `sub_(-1).div_(2)` with no padding, then `(x * 255).type(torch.uint8)`:
    a truncating cast, so 0.0 maps to 127, not 128. Computed in float32 on the input's device
    (the official VAE output is float32; elementwise float32 ops are exact on CPU and GPU).
    """
    unit = frames.detach().float().clamp(-1, 1).sub(-1).div(2)
    return (unit * 255).to(torch.uint8).cpu()


def write_video(frames: Tensor, path: Path, fps: int, *, crf: int = 18, audio: AudioTrack | None = None) -> VideoInfo:
    """Encode `[3, T, H, W]` frames in [-1, 1] as an H.264 (yuv420p) mp4 at `path`, atomically.

    With `audio`, the mp4 also carries it as AAC (192 kb/s, as the official s2v merge),
    trimmed to the video's length. The file is decoded again before it replaces `path`;
    the container is always mp4, whatever the suffix of `path`.
    """
    _require_channels_first(frames, ndim=4, what="video frames [3, T, H, W]")
    _require_finite(frames, path)
    pixels = frames_to_uint8(frames).permute(1, 2, 3, 0).contiguous().numpy()  # [T, H, W, 3]
    return write_video_uint8(pixels, path, fps, crf=crf, audio=audio)


def write_video_uint8(pixels: np.ndarray, path: Path, fps: float, *, crf: int = 18,
                      audio: AudioTrack | None = None) -> VideoInfo:
    """Encode RGB uint8 `[T, H, W, 3]` frames as `write_video` does (atomically, verified)."""
    num_frames, height, width = pixels.shape[:3]
    if num_frames == 0:
        raise InputError(f"cannot write {path}: the video has no frames")
    if height % 2 or width % 2:
        raise InputError(f"cannot write {path}: {width}x{height} has an odd side but H.264 {_PIXEL_FORMAT} "
                         f"needs even width and height; use a Wan size (multiples of 16) or crop by one pixel")
    if fps <= 0:
        raise InputError(f"cannot write {path}: fps must be positive, got {fps}")
    if not 0 <= crf <= _MAX_CRF:
        raise InputError(f"cannot write {path}: crf must be in [0, {_MAX_CRF}] (lower is better quality), got {crf}")
    # A source video's own rate may be fractional (NTSC 30000/1001).
    rate = Fraction(fps).limit_denominator(1001)
    with _atomic_output(path) as temporary:
        with av.open(str(temporary), mode="w", format="mp4") as container:
            stream = container.add_stream(_ENCODER, rate=rate, options={"crf": str(crf)})
            stream.width, stream.height, stream.pix_fmt = width, height, _PIXEL_FORMAT
            # Every stream exists before the first packet: the mp4 header is written then.
            audio_stream = _add_audio_stream(container, audio) if audio is not None else None
            for index, image in enumerate(pixels):
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts, frame.time_base = index, 1 / rate
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))  # flush the frames the encoder holds back
            if audio_stream is not None:
                _mux_audio(container, audio_stream, audio, seconds=num_frames / fps)
        decoded, decoded_size = _count_decoded_frames(temporary)
        if audio is not None and not _decodes_audio(temporary):
            raise OutputWriteError(f"verification of {path} failed: its audio stream does not decode; "
                                   "nothing was written (check the PyAV/FFmpeg install)")
        if (decoded, decoded_size) != (num_frames, (width, height)):
            raise OutputWriteError(
                f"verification of {path} failed: it decodes to {decoded} frames of "
                f"{decoded_size[0]}x{decoded_size[1]}, expected {num_frames} of {width}x{height}; "
                f"nothing was written (check free disk space and the PyAV/FFmpeg install)")
    return VideoInfo(path=path, frames=num_frames, width=width, height=height, fps=fps, codec=VIDEO_CODEC)


def read_video(path: Path, max_frames: int = MAX_FRAMES) -> tuple[Tensor, float]:
    """Decode every frame of a video file to `[3, T, H, W]` float in [-1, 1], plus its frame rate
    (the limits as `read_video_uint8`)."""
    frames, rate = read_video_uint8(path, max_frames)
    return _uint8_to_signed_unit(frames.permute(3, 0, 1, 2)), rate  # [T, H, W, 3] -> [3, T, H, W]


def read_video_uint8(path: Path, max_frames: int = MAX_FRAMES) -> tuple[Tensor, float]:
    """Decode every frame of a video file to RGB uint8 `[T, H, W, 3]` (as decord's
    `get_batch().asnumpy()`), plus its frame rate.

    Refuses a video beyond `max_frames` frames or the limits of wanrt.limits: from the
    container's header first, then while decoding (a header may omit or understate them).
    """
    _require_file(path, "video")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"video {path} has no video stream; pass an mp4/mkv/webm video file")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            _check_video_header(path, container, stream, rate, max_frames)
            images, total_pixels = [], 0
            for frame in container.decode(stream):
                total_pixels += frame.width * frame.height
                _check_video_size(path, len(images) + 1, frame.width, frame.height, total_pixels, max_frames)
                images.append(frame.to_ndarray(format="rgb24"))
    except (av.error.FFmpegError, OSError) as error:
        raise InputError(f"cannot decode video {path} ({_reason(error)}); the file is corrupt or not a video, "
                         f"re-export it as mp4") from None
    if not images:
        raise InputError(f"video {path} contains no decodable frames; re-export it as mp4")
    if not rate:
        raise InputError(f"video {path} declares no frame rate; re-export it with a fixed fps")
    return torch.from_numpy(np.stack(images)), float(rate)


def _check_video_header(path: Path, container: av.container.InputContainer, stream: av.video.VideoStream,
                        rate: Fraction | None, max_frames: int) -> None:
    """The limits, as far as the container states them (each may be absent)."""
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    else:
        seconds = container.duration / av.time_base if container.duration is not None else None
    if seconds is not None and seconds > MAX_VIDEO_SECONDS:
        raise InputTooLargeError(f"video {path} lasts {seconds:.0f} s; wanrt reads at most "
                                 f"{MAX_VIDEO_SECONDS:.0f} s, trim it first (e.g. ffmpeg -t)")
    frames = stream.frames or (round(seconds * rate) if seconds is not None and rate else 0)
    width, height = stream.width, stream.height
    _check_video_size(path, frames, width, height, frames * width * height, max_frames)


def _check_video_size(path: Path, frames: int, width: int, height: int, total_pixels: int,
                      max_frames: int) -> None:
    fix = "trim or downscale it first (e.g. with ffmpeg)"
    if width * height > MAX_VIDEO_FRAME_PIXELS:
        raise InputTooLargeError(f"video {path} has {width}x{height} frames, more than the "
                                 f"{MAX_VIDEO_FRAME_PIXELS} pixels wanrt reads per frame; {fix}")
    if frames > max_frames:
        raise InputTooLargeError(f"video {path} has more than {max_frames} frames, the most wanrt reads; {fix}")
    if total_pixels > MAX_VIDEO_TOTAL_PIXELS:
        raise InputTooLargeError(f"video {path} holds more than {MAX_VIDEO_TOTAL_PIXELS} pixels in all "
                                 f"(frames x width x height), the most wanrt reads; {fix}")


def load_image(path: Path) -> Tensor:
    """Read an image file as RGB `[3, H, W]` float in [-1, 1], as the official i2v code does.

    Like the official code (`Image.open(...).convert("RGB")`), EXIF orientation is NOT
    applied: a phone photo stored rotated is used as stored, for parity. Alpha is dropped,
    not composited, for the same reason.
    """
    return _uint8_to_signed_unit(load_image_uint8(path).permute(2, 0, 1).contiguous())


def load_image_uint8(path: Path) -> Tensor:
    """An image file as RGB uint8 `[H, W, 3]` (EXIF orientation and alpha as `load_image`)."""
    _require_file(path, "image")
    try:
        with Image.open(path) as image:
            # `open` reads the header only: refuse a decompression bomb before decoding it.
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise InputTooLargeError(
                    f"image {path} is {image.width}x{image.height}, more than the {MAX_IMAGE_PIXELS} pixels "
                    f"wanrt reads; downscale it first (Wan2.2 uses at most 1280x720)")
            image.load()  # decode fully now, so a truncated file fails here and not later
            rgb = image.convert("RGB")
    except _PIL_DECODE_ERRORS as error:
        raise InputError(f"cannot decode image {path} ({_reason(error)}); the file is corrupt, truncated or "
                         f"not an image, re-save it as PNG or JPEG") from None
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy())


def write_image(frame: Tensor, path: Path) -> None:
    """Save one `[3, H, W]` frame in [-1, 1] as a PNG at `path`, atomically.

    Uses the video's truncating conversion (`frames_to_uint8`), so a first frame saved here has
    exactly the pixels that went into the mp4 (torchvision `save_image` would round instead).
    """
    _require_channels_first(frame, ndim=3, what="an image [3, H, W]")
    _require_finite(frame[:, None], path)
    pixels = frames_to_uint8(frame).permute(1, 2, 0).contiguous().numpy()  # [H, W, 3]
    with _atomic_output(path) as temporary:
        Image.fromarray(pixels).save(temporary, format="PNG")
        with Image.open(temporary) as written:
            written.load()
            if written.size != (pixels.shape[1], pixels.shape[0]):
                raise OutputWriteError(f"verification of {path} failed: the PNG reads back as "
                                       f"{written.size[0]}x{written.size[1]}; nothing was written")


def _uint8_to_signed_unit(pixels: Tensor) -> Tensor:
    # The op order of TF.to_tensor (float32 / 255) then .sub_(0.5).div_(0.5): exact parity.
    return pixels.to(torch.float32).div(255).sub_(0.5).div_(0.5)


def _require_channels_first(pixels: Tensor, ndim: int, what: str) -> None:
    # Shape mistakes are programming errors, not user input: plain ValueError.
    if not isinstance(pixels, Tensor) or pixels.ndim != ndim or pixels.shape[0] != 3:
        shape = tuple(pixels.shape) if isinstance(pixels, Tensor) else type(pixels).__name__
        raise ValueError(f"expected {what} with 3 RGB channels first, got {shape}")


def _require_finite(frames: Tensor, path: Path) -> None:
    """Refuse `[3, T, H, W]` frames with NaN/Inf: the uint8 cast would silently make them black."""
    finite_per_frame = torch.isfinite(frames.detach()).flatten(2).all(dim=2).all(dim=0)
    bad = (~finite_per_frame).nonzero().flatten().tolist()
    if bad:
        others = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise NonFiniteError(f"refusing to write {path}: frame {bad[0]}{others} of {frames.shape[1]} contains "
                             f"NaN/Inf; the generation diverged (try float32/bfloat16 instead of float16, "
                             f"or another seed)")


def _require_file(path: Path, kind: str) -> None:
    if not path.exists():
        raise InputError(f"{kind} {path} does not exist; check the path")
    if not path.is_file():
        raise InputError(f"{kind} {path} is not a file (a directory?); pass the path of the {kind} file itself")


def _count_decoded_frames(path: Path) -> tuple[int, tuple[int, int]]:
    """Number of frames `path` decodes to, and the (width, height) of the last one."""
    count, size = 0, (0, 0)
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            count, size = count + 1, (frame.width, frame.height)
    return count, size


_AAC_FRAME_SAMPLES = 1024
_AAC_BIT_RATE = 192_000


def _audio_channels(audio: AudioTrack) -> Tensor:
    """Mono or stereo samples: more channels are mixed down to mono."""
    return audio.samples.mean(dim=0, keepdim=True) if audio.samples.shape[0] > 2 else audio.samples


def _add_audio_stream(container, audio: AudioTrack):
    layout = "mono" if _audio_channels(audio).shape[0] == 1 else "stereo"
    stream = container.add_stream("aac", rate=audio.rate, layout=layout)
    stream.bit_rate = _AAC_BIT_RATE
    return stream


def _mux_audio(container, stream, audio: AudioTrack, seconds: float) -> None:
    """Encode `audio`, cut at `seconds`, into the AAC `stream`."""
    samples = _audio_channels(audio)[:, :round(seconds * audio.rate)]
    layout = stream.layout.name
    planar = samples.float().clamp(-1, 1).contiguous().numpy()
    for start in range(0, planar.shape[1], _AAC_FRAME_SAMPLES):
        frame = av.AudioFrame.from_ndarray(planar[:, start:start + _AAC_FRAME_SAMPLES].copy(),
                                           format="fltp", layout=layout)
        frame.sample_rate, frame.pts, frame.time_base = audio.rate, start, Fraction(1, audio.rate)
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def _decodes_audio(path: Path) -> bool:
    with av.open(str(path)) as container:
        return bool(container.streams.audio) and any(True for _ in container.decode(audio=0))


@contextmanager
def _atomic_output(path: Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside `path`; on success it replaces `path`, on any failure it is deleted."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"output {path} is a directory; pass a file path")
    temporary = _reserve_temporary(path)
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException as error:  # including KeyboardInterrupt: never leave a partial file behind
        temporary.unlink(missing_ok=True)
        if isinstance(error, (OSError, av.error.FFmpegError)):
            raise OutputWriteError(f"could not write {path} ({_reason(error)}); check free disk space and "
                                   f"write permission in {path.parent}") from error
        raise


def _reserve_temporary(path: Path) -> Path:
    """Create an empty, uniquely named hidden file next to `path` (same file system, so os.replace is atomic)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            temporary = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")
            try:
                # Exclusive creation with the default mode (umask applies, unlike mkstemp's 0600).
                with open(temporary, "xb"):
                    return temporary
            except FileExistsError:
                continue
    except OSError as error:
        raise OutputWriteError(f"could not create a file in {path.parent} ({_reason(error)}); "
                               f"check that the folder is writable") from error


def _reason(error: BaseException) -> str:
    """The first line of an exception's message, for one-line user errors."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
