"""Shared test helpers: fixture paths and the parity tolerance."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"

# Without CUDA the Triton kernels (wanrt.kernels) run in Triton's interpreter on CPU tensors.
# Triton reads this when a kernel is defined, so it is set before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Parity bar (see tests/fixtures/README.md): float32 re-implementations land near 1e-5
# absolute; anything at or above 1e-3 is a bug. We require 1e-4 relative to the output scale.
PARITY_RTOL = 1e-4


def load_fixture(relative: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors of `<relative>.safetensors` and the metadata of `<relative>.json`."""
    base = FIXTURES / relative
    return load_file(str(base.with_suffix(".safetensors"))), json.loads(base.with_suffix(".json").read_text())


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()


def assert_parity(actual: torch.Tensor, expected: torch.Tensor, name: str = "",
                  rtol: float = PARITY_RTOL) -> float:
    """max|actual - expected| <= rtol * max(1, max|expected|); returns the error."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    error = max_abs_error(actual, expected)
    bound = rtol * max(1.0, expected.abs().max().item())
    assert error <= bound, f"{name}: max abs error {error:.3g} > {bound:.3g}"
    return error


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny random checkpoints in the official layout, one per tiny task."""
    from wanrt.configs import get_task
    from wanrt.demo import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {name: write_tiny_checkpoint(root / name, get_task(name))
            for name in ("tiny-t2v", "tiny-i2v", "tiny-ti2v")}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """A private WANRT_CACHE_DIR (embedding cache, hash memo, demo checkpoints)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("WANRT_CACHE_DIR", str(folder))
    return folder


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same RNG state, so random inputs are reproducible."""
    torch.manual_seed(0)
    yield
