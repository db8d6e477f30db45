"""Checks of a generation request's values that must hold before anything loads.

A prompt that cannot be stored (invalid UTF-8 from the shell), a NaN guide scale or a
frame count of 400001 must fail in the first second, not after the experts loaded or
all steps ran.
"""

from __future__ import annotations

import math

from wanrt.errors import InputError
from wanrt.limits import MAX_FRAMES, MAX_PROMPT_CHARS


def check_text(text: str, flag: str) -> str:
    """Refuse text the sidecar and the latents file could not store: Python keeps invalid
    UTF-8 from the command line as lone surrogates (`$'\\xff\\xfe'`), which no UTF-8 writer accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InputError(f"{flag} is not valid UTF-8 text (bytes {text[error.start:error.end]!r} at "
                         f"character {error.start}); pass it in UTF-8") from None
    if len(text) > MAX_PROMPT_CHARS:
        raise InputError(f"{flag} has {len(text)} characters; at most {MAX_PROMPT_CHARS} are accepted "
                         "(the text encoder reads 512 tokens)")
    return text


def check_frame_num(frame_num: int) -> int:
    if frame_num > MAX_FRAMES:
        raise InputError(f"--frame-num {frame_num} is more than the {MAX_FRAMES} frames wanrt generates")
    return frame_num


def check_shift(shift: float) -> float:
    if not math.isfinite(shift) or shift <= 0:
        raise InputError(f"--shift {shift} must be a positive number (e.g. 5.0)")
    return shift


def check_guide_scale(scales: tuple[float, float]) -> tuple[float, float]:
    if not all(math.isfinite(scale) for scale in scales):
        raise InputError(f"--guide-scale {','.join(map(str, scales))} must be finite numbers (e.g. 5.0)")
    return scales


def check_gib(value: float | None, flag: str) -> float | None:
    """A budget in GiB (`--vram`, `--ram`, `--engine-cache-gib`): positive and finite, or None (the default)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise InputError(f"{flag} {value} must be a positive number of GiB (e.g. 24)")
    return value
