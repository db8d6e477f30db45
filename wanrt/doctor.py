"""`wanrt doctor`: what this machine has, what each optional extra enables, and which
official runs the memory planner says fit here.

Everything is read without loading a model or initialising more than CUDA's device
queries, so it answers in a second and is safe to paste into a bug report.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from wanrt import __version__
from wanrt.configs import ModelType, get_task
from wanrt.hashing import cache_root
from wanrt.runtime.planner import Precision, make_plan

# (distribution, importable module, extra that installs it, what it enables).
OPTIONAL_PACKAGES: tuple[tuple[str, str, str | None, str], ...] = (
    ("triton", "triton", None, "torch.compile / --engine compile|aoti kernels on GPU"),
    ("onnx", "onnx", "onnx", "wanrt export --backend onnx|tensorrt"),
    ("onnxruntime", "onnxruntime", "onnx", "checking exported ONNX graphs against eager"),
    ("tensorrt", "tensorrt", "tensorrt", "--engine tensorrt"),
    ("optimum-quanto", "optimum.quanto", "quant", "quantize int8-wo / int4-wo schemes"),
    ("bitsandbytes", "bitsandbytes", "quant", "bitsandbytes weight-only baselines"),
    ("diffusers", "diffusers", "baselines", "diffusers baselines in wanrt bench"),
    ("matplotlib", "matplotlib", "bench", "plots in wanrt bench reports"),
    ("kubeflow-training", "kubeflow.training", "k8s", "wanrt k8s PyTorchJob manifests"),
    ("sageattention", "sageattention", "sage", "the sageattention library as an attention backend"),
    ("gguf", "gguf", "gguf", "GGUF checkpoint files"),
    ("dashscope", "dashscope", "prompt", "--use_prompt_extend with DashScope"),
)

# The official runs checked against the planner: (task, size, precision).
PLANNED_RUNS: tuple[tuple[str, str, str], ...] = (
    ("t2v-A14B", "832*480", "bf16"), ("t2v-A14B", "832*480", "fp8"),
    ("t2v-A14B", "1280*720", "bf16"), ("t2v-A14B", "1280*720", "fp8"),
    ("i2v-A14B", "1280*720", "fp8"), ("ti2v-5B", "1280*704", "bf16"),
)


@dataclass(frozen=True)
class PackageStatus:
    name: str
    version: str | None   # None: not installed
    extra: str | None      # the wanrt extra that installs it, if one does
    enables: str

    @property
    def install_hint(self) -> str:
        return f"pip install 'wanrt[{self.extra}]'" if self.extra else f"pip install {self.name}"


@dataclass(frozen=True)
class GpuInfo:
    name: str
    arch: str              # "sm_89"
    vram_gib: float


@dataclass(frozen=True)
class DoctorReport:
    wanrt: str
    python: str
    platform: str
    torch: str
    cuda_runtime: str | None
    driver: str | None
    gpus: tuple[GpuInfo, ...]
    ram_gib: float
    cache_dir: Path
    cache_free_gib: float
    pyav: str | None
    ffmpeg: str | None
    packages: tuple[PackageStatus, ...]
    runs: tuple[tuple[str, str, str, str], ...]   # task, size, precision, verdict

    def lines(self) -> list[str]:
        gpus = [f"GPU {index}: {gpu.name}, {gpu.arch}, {gpu.vram_gib:.1f} GiB"
                for index, gpu in enumerate(self.gpus)] or ["GPU: none (CUDA not available): runs use the CPU "
                                                            "in float32; only the tiny-* demo tasks are practical"]
        lines = [f"wanrt {self.wanrt}", f"python {self.python} on {self.platform}",
                 f"torch {self.torch}, CUDA runtime {self.cuda_runtime or 'none'}, driver {self.driver or 'none'}",
                 *gpus, f"host RAM: {self.ram_gib:.1f} GiB",
                 f"cache: {self.cache_dir} ({self.cache_free_gib:.1f} GiB free)",
                 f"PyAV {self.pyav or 'MISSING (pip install av)'}, FFmpeg {self.ffmpeg or 'unknown'}",
                 "optional packages:"]
        for package in self.packages:
            state = package.version or f"not installed ({package.install_hint})"
            lines.append(f"  {package.name:<18} {state:<46} {package.enables}")
        budget = (f"{self.gpus[0].vram_gib:.0f} GiB VRAM" if self.gpus else "a 24 GiB GPU (none here)")
        lines.append(f"planner, official runs on {budget} and {self.ram_gib:.0f} GiB RAM:")
        lines += [f"  {task:<9} {size:<9} {precision:<5} {verdict}" for task, size, precision, verdict in self.runs]
        return lines


def _package(name: str, module: str, extra: str | None, enables: str) -> PackageStatus:
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        version = None
    if version is not None and importlib.util.find_spec(module.split(".")[0]) is None:
        version = None   # metadata left behind by a broken install
    return PackageStatus(name, version, extra, enables)


def _driver_version() -> str | None:
    """nvidia-smi's driver version; torch exposes only the runtime's."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip().splitlines()[0] if result.stdout.strip() else None


def _gpus() -> tuple[GpuInfo, ...]:
    if not torch.cuda.is_available():
        return ()
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append(GpuInfo(props.name, f"sm_{props.major}{props.minor}", props.total_memory / 2**30))
    return tuple(gpus)


def _pyav() -> tuple[str | None, str | None]:
    try:
        import av
    except ImportError:
        return None, None
    libavformat = av.library_versions.get("libavformat")
    return av.__version__, f"libavformat {'.'.join(map(str, libavformat))}" if libavformat else None


def _free_gib(folder: Path) -> float:
    existing = folder
    while not existing.exists():
        existing = existing.parent
    return shutil.disk_usage(existing).free / 2**30


def _run_verdicts(vram_gib: float, ram_gib: float) -> tuple[tuple[str, str, str, str], ...]:
    verdicts = []
    for task, size, precision in PLANNED_RUNS:
        spec = get_task(task)
        plan = make_plan(spec, size, spec.sample.frame_num, Precision(precision), vram_gib, ram_gib,
                         image=spec.dit.model_type is ModelType.I2V)
        if not plan.fits:
            verdict = "does not fit: " + (plan.notes[-1] if plan.notes else "over budget")
        elif plan.streaming:
            verdict = f"fits, streaming {plan.streamed_blocks} of {plan.num_blocks} blocks"
        else:
            verdict = "fits, resident"
        verdicts.append((task, size, precision, verdict))
    return tuple(verdicts)


def diagnose() -> DoctorReport:
    gpus = _gpus()
    ram_gib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    pyav, ffmpeg = _pyav()
    cache = cache_root()
    return DoctorReport(
        wanrt=__version__, python=platform.python_version(), platform=f"{sys.platform} {platform.machine()}",
        torch=torch.__version__, cuda_runtime=torch.version.cuda, driver=_driver_version(), gpus=gpus,
        ram_gib=ram_gib, cache_dir=cache, cache_free_gib=_free_gib(cache), pyav=pyav, ffmpeg=ffmpeg,
        packages=tuple(_package(*entry) for entry in OPTIONAL_PACKAGES),
        runs=_run_verdicts(gpus[0].vram_gib if gpus else 24.0, ram_gib))
