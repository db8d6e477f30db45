"""The runner interface: how the sampling loop runs a DiT expert, and the VAE its decode steps,
through an engine (eager, torch.compile, an AOTInductor package, a TensorRT engine).

An engine is attached to a pipeline through its two hooks and nothing else:
`pipeline.wrap_expert = engine.wrap_expert` (the callable the loop runs for an expert, made
once per expert after loading, quantization and streaming registration) and
`pipeline.prepare_vae = engine.prepare_vae` (applied once to the VAE after it loads).
Engines are a registry of `EngineKind` -> class, imported on use; `auto` picks the best one
this machine can run and says why.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from wanrt.configs import TaskSpec
from wanrt.errors import InputError, parse_choice
from wanrt.export.build import Backend, require_backend
from wanrt.export.manifest import MANIFEST_FILE, ArtifactError, device_arch, read_manifest
from wanrt.hashing import cache_root
from wanrt.request_checks import check_gib
from wanrt.loading.checkpoint import Expert
from wanrt.models.dit import WanDiT
from wanrt.models.vae import WanVAE

if TYPE_CHECKING:
    from wanrt.pipelines import Pipeline

# The build-on-demand cache keeps at most this much; least recently used artifacts go first.
DEFAULT_CACHE_BYTES = 64 * 2**30
ENGINE_CACHE_SUBDIR = "engines"


class EngineKind(str, Enum):
    EAGER = "eager"
    COMPILE = "compile"
    AOTI = "aoti"
    TENSORRT = "tensorrt"
    AUTO = "auto"


@dataclass(frozen=True)
class EngineOptions:
    task: TaskSpec
    device: torch.device
    precision: str = "bf16"          # the experts' weight scheme (bf16, fp8, int8)
    # A folder written by `wanrt export`: used as is, never built into. None: the cache
    # under $WANRT_CACHE_DIR/engines, where missing artifacts are built on first use.
    engine_dir: Path | None = None
    cache_bytes: int = DEFAULT_CACHE_BYTES

    @property
    def cache_dir(self) -> Path:
        return self.engine_dir if self.engine_dir is not None else cache_root() / ENGINE_CACHE_SUBDIR


# The loop calls `runner(latents, timestep, context, y=None) -> prediction` for each forward.
ExpertRunner = Callable[..., Tensor]


class DiTEngine(Protocol):
    def wrap_expert(self, expert: Expert, model: WanDiT) -> ExpertRunner:
        """The callable the sampling loop runs for `expert`; block streaming must keep working
        (its hooks sit on each block's `__call__`)."""


class VAEStepEngine(Protocol):
    def prepare_vae(self, vae: WanVAE) -> None:
        """Route the VAE's steady-state causal steps through the engine (or leave them)."""


class Engine:
    """An engine's identity and the eager defaults of both hooks; subclasses override them."""

    kind = EngineKind.EAGER

    def __init__(self, options: EngineOptions, reason: str = "") -> None:
        self.options = options
        self.reason = reason  # why this engine runs (set when `auto` picked it)

    def wrap_expert(self, expert: Expert, model: WanDiT) -> ExpertRunner:
        return model

    def prepare_vae(self, vae: WanVAE) -> None:
        return None

    def describe(self) -> str:
        """One line for the user and the sidecar: what runs, from where."""
        return f"{self.kind.value} ({self.reason})" if self.reason else self.kind.value


def attach(pipeline: "Pipeline", engine: Engine) -> Engine:
    """Make `pipeline` run its experts and VAE steps through `engine`."""
    pipeline.wrap_expert = engine.wrap_expert
    pipeline.prepare_vae = engine.prepare_vae
    return engine


def use_engine(pipeline: "Pipeline", kind: EngineKind | str, engine_dir: Path | None = None,
               cache_gib: float | None = None) -> Engine:
    """Attach the engine of `kind` (`auto`: the best available) to `pipeline`; the cache
    it builds into keeps at most `cache_gib` (default DEFAULT_CACHE_BYTES)."""
    kind = parse_engine_kind(kind)
    cache_bytes = DEFAULT_CACHE_BYTES if cache_gib is None else int(check_gib(cache_gib, "--engine-cache-gib") * 2**30)
    if engine_dir is not None:
        if kind in (EngineKind.EAGER, EngineKind.COMPILE):
            raise InputError(f"--engine-dir is read by --engine aoti, tensorrt or auto, not {kind.value}")
        if not Path(engine_dir).is_dir():
            raise InputError(f"--engine-dir {engine_dir} is not a folder; write it with `wanrt export --out "
                             f"{engine_dir}` or leave it out to build into the cache")
    options = EngineOptions(pipeline.task, pipeline.device, pipeline.precision,
                            Path(engine_dir) if engine_dir is not None else None, cache_bytes)
    return attach(pipeline, make_engine(kind, options))


ENGINES: dict[EngineKind, str] = {
    EngineKind.EAGER: "wanrt.engines.eager:EagerEngine",
    EngineKind.COMPILE: "wanrt.engines.compiled:CompiledEngine",
    EngineKind.AOTI: "wanrt.engines.aoti_runner:AOTIEngine",
    EngineKind.TENSORRT: "wanrt.engines.tensorrt_runner:TensorRTEngine",
}


# Engines that run the artifacts of an export backend.
ENGINE_BACKENDS: dict[EngineKind, Backend] = {EngineKind.AOTI: Backend.AOTI, EngineKind.TENSORRT: Backend.TENSORRT}


def parse_engine_kind(value: EngineKind | str) -> EngineKind:
    return parse_choice(EngineKind, value, "--engine")


def engine_class(kind: EngineKind) -> type[Engine]:
    module, name = ENGINES[kind].split(":")
    return getattr(importlib.import_module(module), name)


def _has_artifacts(options: EngineOptions, backend: Backend) -> bool:
    """Whether the engine folder holds a DiT block artifact of `backend` for this device
    (the manifest's identity is checked in full when an artifact is loaded)."""
    arch = device_arch(options.device)
    for manifest_path in options.cache_dir.glob(f"dit_block-*/{MANIFEST_FILE}"):
        try:
            identity = read_manifest(manifest_path.parent).identity
        except ArtifactError:
            continue
        if identity.backend == backend.value and identity.device_arch == arch:
            return True
    return False


def pick_auto(options: EngineOptions) -> tuple[EngineKind, str]:
    """The best engine available here, and why: a built TensorRT engine, else a built
    AOTInductor package, else torch.compile on a GPU, else eager."""
    cuda = options.device.type == "cuda"
    where = options.cache_dir
    if cuda and importlib.util.find_spec("tensorrt") is not None and _has_artifacts(options, Backend.TENSORRT):
        return EngineKind.TENSORRT, f"TensorRT engines found in {where}"
    if _has_artifacts(options, Backend.AOTI):
        return EngineKind.AOTI, f"AOTInductor packages found in {where}"
    if cuda:
        return EngineKind.COMPILE, f"no built engine in {where}; torch.compile of the repeated block"
    return EngineKind.EAGER, f"no built engine in {where} and no GPU for torch.compile"


def make_engine(kind: EngineKind | str, options: EngineOptions) -> Engine:
    """The engine of `kind`; `auto` resolves to one and its `describe()` says which and why.

    An engine that cannot run here (TensorRT not installed, no GPU) raises a WanrtError
    naming what is missing."""
    kind = parse_engine_kind(kind)
    if kind in ENGINE_BACKENDS:
        # Before importing the engine: a missing TensorRT is one clear error, not an ImportError.
        require_backend(ENGINE_BACKENDS[kind], options.device)
    if kind is not EngineKind.AUTO:
        return engine_class(kind)(options)
    chosen, reason = pick_auto(options)
    # Artifacts found by auto may not cover every component or shape: those run eagerly.
    extra = {"missing_runs_eager": True} if chosen in (EngineKind.AOTI, EngineKind.TENSORRT) else {}
    return engine_class(chosen)(options, reason=f"auto: {reason}", **extra)
