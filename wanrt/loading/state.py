"""Strict loading of tensors into a model built on the meta device.

The model is constructed on `meta` (no memory), the checkpoint's keys and shapes are
checked against it before any data is read, then tensors are assigned shard by shard, so
the weights exist once in host memory.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from wanrt.errors import CheckpointError
from wanrt.loading.files import TensorInfo

MAX_LISTED_KEYS = 8


def key_listing(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    return shown + (f" (+{len(keys) - MAX_LISTED_KEYS} more)" if len(keys) > MAX_LISTED_KEYS else "")


def check_state_keys(model: nn.Module, found: Mapping[str, TensorInfo | Tensor], source: str) -> None:
    """Every parameter present with its shape, and nothing left over; else one clear error."""
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    missing = expected.keys() - found.keys()
    unexpected = found.keys() - expected.keys()
    mismatched = [f"{key} {tuple(found[key].shape)} != {shape}" for key, shape in expected.items()
                  if key in found and tuple(found[key].shape) != shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {key_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {key_listing(unexpected)}")
    if mismatched:
        problems.append(f"wrong shapes: {key_listing(mismatched)}")
    if problems:
        raise CheckpointError(f"{source}: does not match {type(model).__name__}: " + "; ".join(problems))


def cast_for_model(key: str, tensor: Tensor, dtype: torch.dtype | None,
                   keep_fp32: tuple[str, ...], owned: bool = False) -> Tensor:
    """Cast floating tensors to `dtype`, except those under a module named in `keep_fp32`.

    The result always owns fresh memory: tensors read from a file may be views of a
    memory map (invalid if the file changes under a running job) at odd alignments (which
    changes CPU float32 rounding). The copy is made one tensor at a time. A tensor the
    caller has just read into its own buffer (`owned`) is kept as it is when no cast is due.
    """
    if dtype is not None and tensor.is_floating_point():
        target = torch.float32 if any(part in keep_fp32 for part in key.split(".")) else dtype
        if tensor.dtype != target:
            return tensor.to(target)
    return tensor if owned else tensor.clone()


def assign_tensors(model: nn.Module, chunks: Iterable[Mapping[str, Tensor]],
                   dtype: torch.dtype | None = None) -> nn.Module:
    """Assign already-validated tensors chunk by chunk (one chunk per shard)."""
    keep_fp32 = tuple(getattr(model, "keep_in_fp32", ()))
    for chunk in chunks:
        # Each source tensor is dropped as soon as its cast/copy exists, so a shard is never
        # held twice (the caller's chunk dict is its only other owner).
        pending = dict(chunk)
        del chunk
        cast = {}
        for key in list(pending):
            cast[key] = cast_for_model(key, pending.pop(key), dtype, keep_fp32)
        model.load_state_dict(cast, strict=False, assign=True)
    still_meta = [name for name, t in model.state_dict().items() if t.is_meta]
    if still_meta:
        raise CheckpointError(f"parameters never loaded: {key_listing(still_meta)}")
    return model.eval().requires_grad_(False)
