"""Building artifacts of any backend into an `ArtifactStore`: the one path that `wanrt export`
and the runtime's build-on-demand cache share.

Backends are a registry (`BUILDERS`, `BACKEND_VERSIONS`); the ONNX and TensorRT ones live in
`export/onnx_export.py` and `export/tensorrt_build.py` and are imported only when used, so a
machine without onnx or TensorRT never imports them.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch
from torch import nn

from wanrt.configs import TaskSpec
from wanrt.errors import InputError, parse_choice
from wanrt.export.manifest import (ArtifactStore, BuiltFiles, Identity, Manifest, device_arch,
                                   interface_sha256, tensors_sha256)
from wanrt.export.specs import VAE_STEPS, Component, ExportSpec, compute_dtype_of, export_module, make_spec
from wanrt.loading.checkpoint import Expert
from wanrt.models.dit import WanDiT
from wanrt.progress import track


class Backend(str, Enum):
    AOTI = "aoti"
    ONNX = "onnx"
    TENSORRT = "tensorrt"


# (spec, model as export_module takes it, empty output folder, device, weight scheme, store
# root) -> the files written.
BuildFn = Callable[[ExportSpec, nn.Module, Path, torch.device, str, Path], BuiltFiles]

ONNX_FILE = "model.onnx"
TENSORRT_FILE = "model.plan"
TIMING_CACHE_FILE = "tensorrt-timing.cache"


def _build_aoti(spec, model, out_dir, device, scheme, root) -> BuiltFiles:
    from wanrt.export.aoti import build_package

    return build_package(spec, model, out_dir, device)


def _build_onnx(spec, model, out_dir, device, scheme, root) -> BuiltFiles:
    from wanrt.export.onnx_export import export_onnx

    export_onnx(spec, model, out_dir / ONNX_FILE)
    # The graph, and its external data file when the weights pass protobuf's 2 GiB.
    files = tuple(sorted(p.name for p in out_dir.iterdir() if p.is_file()))
    return BuiltFiles(files, dynamic=bool(spec.dynamic_axes()), notes="onnx graph; dynamic axes as the spec names them")


def _build_tensorrt(spec, model, out_dir, device, scheme, root) -> BuiltFiles:
    from wanrt.export.onnx_export import export_onnx
    from wanrt.export.tensorrt_build import build_tensorrt_engine

    with tempfile.TemporaryDirectory(prefix="wanrt-onnx-") as staging:
        graph = export_onnx(spec, model, Path(staging) / ONNX_FILE)
        # The timing cache is shared by every build in the store (same GPU, same TensorRT).
        build_tensorrt_engine(graph, spec, out_dir / TENSORRT_FILE, scheme, timing_cache=root / TIMING_CACHE_FILE)
    return BuiltFiles((TENSORRT_FILE,), dynamic=True, notes="one optimization profile per shape profile")


def _onnx_version() -> str:
    from wanrt.export.onnx_export import ONNX_OPSET, require_onnx

    return f"onnx {require_onnx().__version__} opset {ONNX_OPSET}"


def _tensorrt_version() -> str:
    from wanrt.export.tensorrt_build import import_tensorrt

    return import_tensorrt().__version__


BUILDERS: dict[Backend, BuildFn] = {
    Backend.AOTI: _build_aoti,
    Backend.ONNX: _build_onnx,
    Backend.TENSORRT: _build_tensorrt,
}
# Each also checks that the backend can be used here: a missing onnx or TensorRT raises a
# WanrtError saying how to install it.
BACKEND_VERSIONS: dict[Backend, Callable[[], str]] = {
    Backend.AOTI: lambda: torch.__version__,
    Backend.ONNX: _onnx_version,
    Backend.TENSORRT: _tensorrt_version,
}


def parse_backend(value: Backend | str) -> Backend:
    return parse_choice(Backend, value, "--backend")


def require_backend(backend: Backend, device: torch.device) -> str:
    """The backend's version, once it is known to be usable on `device`."""
    version = BACKEND_VERSIONS[backend]()
    if backend is Backend.TENSORRT and device.type != "cuda":
        raise InputError(f"TensorRT engines are built on the GPU they run on; --device {device} is not a CUDA device")
    return version


def precision_label(component: Component, model: nn.Module, scheme: str) -> str:
    """Weight scheme and compute dtype (the VAE always runs float32, unquantized)."""
    dtype = str(compute_dtype_of(model)).removeprefix("torch.")
    if component in VAE_STEPS:
        return dtype
    return f"{scheme}/{dtype}"


def weights_digest(component: Component, model: nn.Module) -> str:
    """sha256 of the weights the artifact bakes in; DIT_BLOCK bakes none (they are inputs)
    and is identified by its weight interface (names, dtypes, shapes)."""
    if component is Component.DIT_BLOCK:
        block = model.blocks[0] if isinstance(model, WanDiT) else model
        return interface_sha256(block.state_dict())
    return tensors_sha256(export_module(component, model))


def artifact_identity(component: Component, backend: Backend, model: nn.Module, device: torch.device,
                      scheme: str, backend_version: str | None = None, weights: str | None = None) -> Identity:
    return Identity(component=component.value, backend=backend.value,
                    backend_version=backend_version or BACKEND_VERSIONS[backend](),
                    precision=precision_label(component, model, scheme), device_arch=device_arch(device),
                    weights_sha256=weights or weights_digest(component, model))


def build_artifact(store: ArtifactStore, spec: ExportSpec, backend: Backend, model: nn.Module,
                   device: torch.device, scheme: str, identity: Identity | None = None,
                   on_build: Callable[[], None] | None = None) -> tuple[Path, Manifest]:
    """The verified artifact of `spec` in `store`, built first if the store builds and has
    none (`on_build` is called just before a build starts)."""
    identity = identity or artifact_identity(spec.component, backend, model, device, scheme)

    def build(tmp: Path) -> BuiltFiles:
        if on_build is not None:
            on_build()
        return BUILDERS[backend](spec, model, tmp, device, scheme, store.root)
    return store.get(identity, spec.profiles[0], build)


# ---------------------------------------------------------------------------- wanrt export


@dataclass(frozen=True)
class ExportTarget:
    """One artifact `wanrt export` builds: a component of one model."""

    component: Component
    label: str          # "high_noise", "blocks 0-39", "vae"
    model: nn.Module    # what export_module takes
    per_token_timesteps: bool = False  # the DiT graphs' per-token variant (ti2v with an image)


def block_groups(experts: Mapping[Expert, WanDiT]) -> list[tuple[str, nn.Module]]:
    """One representative block per weight interface: a single artifact serves all the blocks
    of both experts that share it. Quantization policies that keep some blocks bf16 give a
    second interface (and artifact)."""
    groups: dict[str, list[str]] = {}
    representative: dict[str, nn.Module] = {}
    for expert, model in experts.items():
        for index, block in enumerate(model.blocks):
            key = interface_sha256(block.state_dict())
            groups.setdefault(key, []).append(f"{expert.value}.{index}")
            representative.setdefault(key, block)
    return [(f"blocks {', '.join(_ranges(names))}", representative[key]) for key, names in groups.items()]


def _ranges(names: Sequence[str]) -> Iterator[str]:
    """'high_noise.0', 'high_noise.1', 'high_noise.2' -> 'high_noise 0-2'."""
    by_expert: dict[str, list[int]] = {}
    for name in names:
        expert, index = name.rsplit(".", 1)
        by_expert.setdefault(expert, []).append(int(index))
    for expert, indices in by_expert.items():
        start = previous = indices[0]
        for index in [*indices[1:], None]:
            if index is not None and index == previous + 1:
                previous = index
                continue
            yield f"{expert} {start}-{previous}" if previous != start else f"{expert} {start}"
            if index is not None:
                start = previous = index


def export_targets(components: Sequence[Component], experts: Mapping[Expert, WanDiT],
                   vae: nn.Module | None, timestep_variants: Sequence[bool] = (False,)) -> list[ExportTarget]:
    """What to build; each DiT component once per timestep variant (False: one timestep for
    all tokens, True: per-token timesteps)."""
    targets = []
    for component in components:
        if component in VAE_STEPS:
            targets.append(ExportTarget(component, "vae", vae))
            continue
        if component is Component.DIT_BLOCK:
            models = block_groups(experts)
        else:
            models = [(expert.value, model) for expert, model in experts.items()]
        for per_token in timestep_variants:
            suffix = ", per-token timesteps" if per_token else ""
            targets += [ExportTarget(component, label + suffix, model, per_token) for label, model in models]
    return targets


def export_all(targets: Sequence[ExportTarget], task: TaskSpec, backend: Backend, store: ArtifactStore,
               sizes: Sequence[str], frame_nums: Sequence[int], device: torch.device, scheme: str,
               on_built: Callable[[ExportTarget, Path, Manifest], None] | None = None) -> list[Path]:
    """Build every target over one profile covering `sizes` x `frame_nums`."""
    version = require_backend(backend, device)
    built = []
    for target in track(targets, f"exporting ({backend.value})"):
        model = on_device(target, device)
        spec = make_spec(target.component, model, task, sizes, frame_nums, target.per_token_timesteps)
        identity = artifact_identity(target.component, backend, model, device, scheme, version)
        directory, manifest = build_artifact(store, spec, backend, model, device, scheme, identity)
        built.append(directory)
        if on_built is not None:
            on_built(target, directory, manifest)
    return built


def on_device(target: ExportTarget, device: torch.device) -> nn.Module:
    """What of the model the artifact needs, on `device`: the small pre/post modules in place,
    a block as a copy (a 14B expert never has to fit on the device to be exported)."""
    model = target.model
    if target.component is Component.DIT_BLOCK:
        return copy.deepcopy(model).to(device)
    if target.component in (Component.DIT_PRE, Component.DIT_POST):
        export_module(target.component, model).to(device)  # moves the shared children only
        return model
    return model.to(device)
