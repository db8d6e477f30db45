"""The template video's frames as the official preprocessor picks them, and its resizes.

Frames are resampled to the requested frame rate by nearest timestamp; sizes are fitted to a
pixel area in multiples of 16 and letterboxed on black, with OpenCV's filters as the official
`resize_by_area` / `padding_resize`.
"""

from __future__ import annotations

import math
from pathlib import Path

import av
import cv2
import numpy as np

from wanrt.errors import InputError
from wanrt.limits import MAX_VIDEO_FRAME_PIXELS, MAX_VIDEO_SECONDS

# Sides of the preprocessed video are multiples of this (the DiT's 16-pixel patches after the VAE).
SIZE_DIVISOR = 16
# Beyond this relative gap between the frames counted and duration x rate, the container's
# frame count is not trusted (the official rule, for variable-rate files).
_FRAME_COUNT_TOLERANCE = 0.1


def frame_indices(num_frames: int, video_fps: float, fps: float) -> list[int]:
    """Official `get_frame_indices`: the source frame nearest each output timestamp at `fps`
    (numpy's round-half-to-even), for int(num_frames / video_fps * fps) output frames."""
    count = int(num_frames / video_fps * fps)
    times = np.arange(0, count) / fps
    return np.clip(np.round(times * video_fps).astype(int), 0, num_frames - 1).tolist()


def read_template(path: Path, fps: float) -> tuple[list[np.ndarray], float]:
    """The template video's RGB frames resampled to `fps` (-1: the video's own rate), and that rate.

    The frame count is the number of frames in the file unless it differs by more than 10% from
    the duration x rate (then the latter, as the official code decides); only the picked
    frames are kept in memory.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--video_path {path} does not exist; give the driving (template) video")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"--video_path {path} has no video stream; give an mp4/mkv/webm video")
            stream = container.streams.video[0]
            video_fps = float(stream.average_rate or stream.guessed_rate or 0)
            if video_fps <= 0:
                raise InputError(f"--video_path {path} declares no frame rate; re-export it with a fixed fps")
            counted, end_seconds = _count_frames(container, stream)
        if counted == 0:
            raise InputError(f"--video_path {path} contains no frames; re-export it as mp4")
        if end_seconds > MAX_VIDEO_SECONDS:
            raise InputError(f"--video_path {path} lasts {end_seconds:.0f} s; wanrt reads at most "
                             f"{MAX_VIDEO_SECONDS:.0f} s, trim it first (e.g. ffmpeg -t)")
        num_frames = counted
        expected = int(end_seconds * video_fps + 0.5)
        if abs(num_frames - expected) / num_frames > _FRAME_COUNT_TOLERANCE:
            num_frames = expected
        output_fps = video_fps if fps == -1 else fps
        # A count taken from the duration may pass the last decodable frame: clamp to it.
        wanted = [min(index, counted - 1) for index in frame_indices(num_frames, video_fps, output_fps)]
        if not wanted:
            raise InputError(f"--video_path {path} is shorter than one frame at --fps {fps:g}; give a longer video")
        frames = _decode_frames(path, sorted(set(wanted)))
    except av.error.FFmpegError as error:
        raise InputError(f"--video_path {path} cannot be decoded ({error}); re-export it as mp4") from None
    return [frames[index] for index in wanted], output_fps


def _count_frames(container, stream) -> tuple[int, float]:
    """Frames in the stream and the end time of the last one in seconds, from the packets
    (no decoding): decord's frame count and `get_frame_timestamp(-1)[-1]`."""
    count, end = 0, 0.0
    for packet in container.demux(stream):
        if packet.size == 0 or packet.pts is None:
            continue  # the demuxer's flush packet
        count += 1
        duration = packet.duration or 0
        end = max(end, float((packet.pts + duration) * stream.time_base))
    if stream.start_time is not None:
        end -= float(stream.start_time * stream.time_base)
    return count, end


def _decode_frames(path: Path, indices: list[int]) -> dict[int, np.ndarray]:
    wanted, frames = set(indices), {}
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if frame.width * frame.height > MAX_VIDEO_FRAME_PIXELS:
                raise InputError(f"--video_path {path} has {frame.width}x{frame.height} frames, more than the "
                                 f"{MAX_VIDEO_FRAME_PIXELS} pixels wanrt reads per frame; downscale it first")
            if index in wanted:
                frames[index] = frame.to_ndarray(format="rgb24")
            if index >= indices[-1]:
                break
    missing = wanted - frames.keys()
    if missing:
        raise InputError(f"--video_path {path} stops decoding before frame {min(missing)}; re-export it as mp4")
    return frames


def area_size(height: int, width: int, area: int, divisor: int = SIZE_DIVISOR) -> tuple[int, int]:
    """(height, width) of `area` pixels with the aspect ratio of height x width, each side
    floored to a multiple of `divisor` (the official `resize_by_area` always lands here:
    its first attempt, `calculate_new_size`, fails on every call)."""
    aspect = width / height
    new_h = math.sqrt(area / aspect)
    new_w = area / new_h
    return int((new_h // divisor) * divisor), int((new_w // divisor) * divisor)


def resize_to_area(image: np.ndarray, area: int, divisor: int = SIZE_DIVISOR) -> np.ndarray:
    """Official `resize_by_area`: letterbox into `area_size`, INTER_AREA when shrinking."""
    height, width = area_size(image.shape[0], image.shape[1], area, divisor)
    shrinks = height * width < image.shape[0] * image.shape[1]
    return letterbox(image, height, width, cv2.INTER_AREA if shrinks else cv2.INTER_LINEAR)


def letterbox(image: np.ndarray, height: int, width: int, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """Official `padding_resize`: fit `image` [h, w, 3] uint8 inside height x width keeping its
    aspect ratio, centred on black."""
    src_h, src_w = image.shape[:2]
    canvas = np.zeros((height, width, image.shape[2]), np.uint8)
    if src_h / src_w > height / width:
        new_w = int(height / src_h * src_w)
        left = int((width - new_w) / 2)
        canvas[:, left:left + new_w] = cv2.resize(image, (new_w, height), interpolation=interpolation)
    else:
        new_h = int(width / src_w * src_h)
        top = int((height - new_h) / 2)
        canvas[top:top + new_h] = cv2.resize(image, (width, new_h), interpolation=interpolation)
    return canvas
