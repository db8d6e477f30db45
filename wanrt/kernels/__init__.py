"""wanrt's own GPU kernels, written in Triton (tested on the CPU through Triton's interpreter).

Importing a kernel module imports Triton: callers import them lazily, after
`triton_available()`."""

from __future__ import annotations

import functools
import importlib.util


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None
