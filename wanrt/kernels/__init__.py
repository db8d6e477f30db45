"""wanrt's own GPU kernels, written in Triton (tested on the CPU through Triton's interpreter).

Importing a kernel module imports Triton: callers import them lazily, after
`triton_available()`."""

from __future__ import annotations

import functools
import importlib.util
from enum import Enum


class PVPrecision(str, Enum):
    """The dtype of the P·V product of the 8-bit attention (`sage_attention`)."""

    FP16 = "fp16"
    FP8 = "fp8"   # e4m3, needs fp8 tensor cores (SM89+)


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None
