"""`wanrt export`: build compiled artifacts (AOTInductor packages, ONNX graphs, TensorRT
engines) of the DiT experts and the VAE into a folder that `generate --engine-dir` runs."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import torch
import typer

from wanrt.configs import ModelType, TaskSpec
from wanrt.errors import InputError
from wanrt.export.build import Backend, ExportTarget, export_all, export_targets, require_backend
from wanrt.export.manifest import ArtifactStore, Manifest
from wanrt.export.specs import Component, latent_grids
from wanrt.generate import VIDEO_MODEL_TYPES, generation_task, parse_device
from wanrt.pipelines import Pipeline
from wanrt.runtime.planner import Precision

_DIT_COMPONENTS = (Component.DIT_PRE, Component.DIT_BLOCK, Component.DIT_POST)


def default_components(task: TaskSpec) -> list[Component]:
    """What a generation of `task` runs: the DiT graphs, the decoder's steps, and the
    encoder's where the task encodes an image (i2v always, every frame of its conditioning
    video; ti2v with --image, the one image frame, which is a first step alone)."""
    components = [*_DIT_COMPONENTS, Component.VAE_DECODER_FIRST_STEP, Component.VAE_DECODER_STEP]
    if task.dit.model_type is ModelType.I2V:
        components += [Component.VAE_ENCODER_FIRST_STEP, Component.VAE_ENCODER]
    elif task.dit.model_type is ModelType.TI2V:
        components.append(Component.VAE_ENCODER_FIRST_STEP)
    return components


class TimestepGraphs(str, Enum):
    """Which variants of the DiT graphs to build: one timestep for all tokens (every task),
    per-token timesteps (ti2v with an image), or both."""

    SHARED = "shared"
    PER_TOKEN = "per-token"
    BOTH = "both"


def timestep_variants(task: TaskSpec, graphs: TimestepGraphs | None) -> tuple[bool, ...]:
    """The `per_token_timesteps` values to build; the default is every variant the task runs."""
    ti2v = task.dit.model_type is ModelType.TI2V
    graphs = graphs or (TimestepGraphs.BOTH if ti2v else TimestepGraphs.SHARED)
    if graphs is not TimestepGraphs.SHARED and not ti2v:
        raise InputError(f"--timesteps {graphs.value}: only ti2v tasks give tokens their own timesteps "
                         f"(ti2v with --image); {task.name} needs --timesteps shared")
    return {TimestepGraphs.SHARED: (False,), TimestepGraphs.PER_TOKEN: (True,),
            TimestepGraphs.BOTH: (False, True)}[graphs]


def parse_components(text: str) -> list[Component]:
    components = []
    for name in filter(None, (part.strip() for part in text.split(","))):
        try:
            components.append(Component(name))
        except ValueError:
            raise InputError(f"--components {name!r} is unknown; choose from "
                             f"{', '.join(c.value for c in Component)}") from None
    if not components:
        raise InputError("--components needs at least one component")
    return list(dict.fromkeys(components))


def parse_frame_nums(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--frame-nums {text!r} must be comma-separated integers (e.g. 81,121)") from None


def _report(target: ExportTarget, directory: Path, manifest: Manifest) -> None:
    size = sum((directory / name).stat().st_size for name in manifest.files) / 2**20
    shapes = "dynamic shapes" if manifest.dynamic else "static shapes"
    typer.echo(f"{target.component.value} [{target.label}]: {directory} ({size:.1f} MiB, {shapes})")


def export_command(
    ckpt_dir: Annotated[Path, typer.Option("--ckpt-dir", "--ckpt_dir", help="Checkpoint folder.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the artifacts (reuse it with generate --engine-dir).")],
    task: Annotated[str, typer.Option("--task", help="t2v-A14B, i2v-A14B, ti2v-5B or a tiny-* test task.")]
    = "t2v-A14B",
    backend: Annotated[Backend, typer.Option("--backend", help=(
        "aoti: packages `generate --engine aoti` runs; tensorrt: engines `--engine tensorrt` runs; onnx: graphs "
        "that wanrt does not run itself, for inspection (netron), checking against onnxruntime, and building "
        "TensorRT engines on another machine (trtexec) -- the DiT block takes its weights as inputs."))] = Backend.AOTI,
    components: Annotated[str | None, typer.Option(
        "--components", help="Comma-separated: dit_pre, dit_block, dit_post, vae_decoder_first_step, "
                             "vae_decoder_step, vae_encoder_first_step, vae_encoder (default: what the "
                             "task's generation runs).")] = None,
    timesteps: Annotated[TimestepGraphs | None, typer.Option(
        "--timesteps", help="DiT graphs for one timestep per step (shared), per token (per-token: ti2v "
                            "with an image) or both (default: both for ti2v, shared otherwise).")] = None,
    sizes: Annotated[str | None, typer.Option(
        "--sizes", help="Comma-separated WIDTH*HEIGHT the artifacts must serve (default: the task's sizes).")]
    = None,
    frame_nums: Annotated[str | None, typer.Option(
        "--frame-nums", help="Comma-separated frame counts, 4n+1 (default: the task's).")] = None,
    precision: Annotated[Precision, typer.Option(
        "--precision", help="DiT weight precision: bf16, or fp8/int8 quantized as generate --precision does.")]
    = Precision.BF16,
    quantized: Annotated[Path | None, typer.Option(
        "--quantized", help="Folder written by `wanrt quantize` (its experts are exported).")] = None,
    device: Annotated[str | None, typer.Option(
        "--device", help="Device the artifacts run on: cpu, cuda or cuda:N (default: cuda if present).")] = None,
) -> None:
    """Compile the DiT experts and the VAE into artifacts with manifests (one profile covering
    the given sizes and frame counts)."""
    spec = generation_task(task, VIDEO_MODEL_TYPES, "wanrt export")
    target_device = parse_device(device) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    require_backend(backend, target_device)  # a missing TensorRT is reported before any loading
    wanted = parse_components(components) if components is not None else default_components(spec)
    variants = timestep_variants(spec, timesteps)
    size_list = [s.strip() for s in sizes.split(",") if s.strip()] if sizes else list(spec.sample.sizes)
    frames = parse_frame_nums(frame_nums) if frame_nums else [spec.sample.frame_num]
    latent_grids(spec, size_list, frames)  # bad sizes and frame counts fail before loading
    # Weights load to host memory in the dtype they run in; each artifact moves only what it
    # bakes in (or one block) to the device.
    dtype = torch.bfloat16 if target_device.type == "cuda" else torch.float32
    pipeline = Pipeline.from_pretrained(ckpt_dir, spec.name, device="cpu", dtype=dtype,
                                        precision=precision.value, quantized_dir=quantized)
    experts = ({expert: pipeline.dit(expert) for expert in pipeline.files.dit_dirs}
               if any(c in _DIT_COMPONENTS for c in wanted) else {})
    vae = pipeline.vae if any(c not in _DIT_COMPONENTS for c in wanted) else None
    targets = export_targets(wanted, experts, vae, variants)
    export_all(targets, spec, backend, ArtifactStore(out), size_list, frames, target_device,
               pipeline.precision, on_built=_report)
