"""One generation run, start to finish: prompt -> latents file -> mp4 -> JSON sidecar.

The final latents are saved before the VAE runs, so a decode that fails (out of memory, a
full disk) costs only the decode: `decode_latents` (`wanrt decode`) finishes the run from
that file. The sidecar records everything needed to reproduce or audit a video: versions,
device, resolved settings, checkpoint hashes, timings and peak memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import platform
import secrets
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

import wanrt
from wanrt.configs import TASK_NAMES, ModelType, TaskSpec, get_task
from wanrt.errors import InputError, WanrtError
from wanrt.hashing import cache_root, file_sha256, files_under, tensor_sha256, tree_sha256
from wanrt.interrupts import Interrupted
from wanrt.loading.checkpoint import CheckpointFiles
from wanrt.loading.component_files import ComponentFiles, component_formats
from wanrt.loading.files import read_wanrt_safetensors, safetensors_shards
from wanrt.loading.save import DIT_WEIGHTS_STEM, write_atomic, write_json
from wanrt.loading.single_file import is_single_file
from wanrt.pipelines import GenerationRequest, Pipeline, ResolvedRequest, StepInfo, TextEmbeddings, output_size
from wanrt.progress import phase
from wanrt.resume import (DEFAULT_INTERVAL_S, SamplingCheckpointer, SavedSampling, resumed_state,
                          sample_with_checkpoints, sampling_state_path_for)
from wanrt.runtime.planner import Precision, short_dtype_name
from wanrt.video_io import VideoInfo, write_video

_log = logging.getLogger(__name__)
# A sidecar is a few KB; a larger .json beside an output is someone else's file.
_MAX_SIDECAR_BYTES = 2**20

LATENTS_SUFFIX = ".latents.safetensors"
LATENTS_FORMAT = "wanrt-latents/1"
_LATENTS_KEY = "latents"
_EMBEDDING_KEY = "embedding"
# The official CLI draws random seeds up to sys.maxsize; torch generators take < 2**64.
_MAX_SEED = sys.maxsize
# Model types `wanrt generate` samples (animate is not implemented yet); s2v runs through
# `wanrt.s2v_generate`.
# The text/image-to-video family: what preview, refine, quantize and export run.
VIDEO_MODEL_TYPES = (ModelType.T2V, ModelType.I2V, ModelType.TI2V)


class DecodeFailedError(WanrtError):
    """Sampling finished and its latents are saved, but decoding or writing the video failed."""


@dataclass(frozen=True)
class GenerationRecord:
    video_path: Path
    sidecar_path: Path
    # None for s2v (it decodes inside its clip loop), or when no disk could take the latents
    # (the video was still written).
    latents_path: Path | None
    video_info: VideoInfo
    sidecar: Mapping[str, Any]  # what the sidecar file holds


# ---------------------------------------------------------------------- validation


def generation_task(name: str, model_types: Collection[ModelType] = tuple(ModelType),
                    command: str = "wanrt generate") -> TaskSpec:
    """The task for `--task`: one line for a name that does not exist, or for a task of a
    family `command` does not run (preview, refine, quantize and export serve
    `VIDEO_MODEL_TYPES`)."""
    if name not in TASK_NAMES:
        raise InputError(f"--task {name!r} is not available; choose one of {', '.join(TASK_NAMES)}")
    spec = get_task(name)
    if spec.dit.model_type not in model_types:
        runs = ", ".join(task for task in TASK_NAMES if get_task(task).dit.model_type in model_types)
        raise InputError(f"--task {name}: {command} runs {runs}; use wanrt generate for {name}")
    return spec


def parse_device(name: str | None) -> torch.device | None:
    """`--device` as a torch device, checked to exist (None: the pipeline's default)."""
    if name is None:
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {name!r} is not supported; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= available:
            raise InputError(f"--device {name}: this machine has {available} usable CUDA GPU(s); "
                             "use --device cpu or another index")
    return device


def check_output_path(output: Path) -> Path:
    """Refuse an output the run could not write, before hours of sampling."""
    output = Path(output)
    if output.suffix.lower() != ".mp4":
        raise InputError(f"--output {output} must end in .mp4 (wanrt writes H.264 mp4 files)")
    if output.is_dir():
        raise InputError(f"--output {output} is a directory; give a file name ending in .mp4")
    # The folder may not exist yet (it is created); its nearest existing ancestor decides.
    folder = output.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"--output {output}: {folder} is not a writable folder")
    sidecar = sidecar_path_for(output)
    if sidecar.exists() and not _is_wanrt_sidecar(sidecar):
        raise InputError(f"--output {output}: {sidecar} exists and is not a wanrt sidecar; the run would "
                         "replace it, choose another --output")
    return output


def _is_wanrt_sidecar(path: Path) -> bool:
    """Whether `path` is a sidecar an earlier run wrote (which a new run may replace)."""
    try:
        if path.stat().st_size > _MAX_SIDECAR_BYTES:
            return False
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    return isinstance(data, dict) and "wanrt_version" in data


def default_output_path(task: TaskSpec, request: ResolvedRequest, now: datetime | None = None) -> Path:
    """The official naming, `<task>_<size>_<prompt[:50]>_<time>.mp4`, in the working folder,
    with the size the video will have (an image-conditioned run keeps the image's aspect)."""
    prompt = request.prompt.replace(" ", "_").replace("/", "_")[:50]
    stamp = (now or datetime.now()).strftime("%Y%m%d_%H%M%S")
    # 'x' rather than the official '*': a '*' in a file name trips up shells and Windows.
    size = output_size(task, request) if isinstance(request, ResolvedRequest) else request.size
    return Path(f"{task.name}_{size.replace('*', 'x')}_{prompt}_{stamp}.mp4")


def latents_path_for(output: Path) -> Path:
    return Path(output).with_suffix(LATENTS_SUFFIX)


def sidecar_path_for(output: Path) -> Path:
    return Path(output).with_suffix(".json")


# ---------------------------------------------------------------------- embedding cache


class EmbeddingCache:
    """Prompt embeddings on disk, so repeated prompts never load the 11 GB T5 encoder.

    The key covers everything the embedding depends on: the tokenizer files, the T5
    weights, the text length, the encoder's dtype and the prompt. Only file hashes are
    computed (memoised), so a lookup never loads T5.
    """

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else cache_root() / "embeddings"

    def _path(self, pipeline: Pipeline, prompt: str) -> Path:
        files = pipeline.files
        if files is None:
            raise InputError("the embedding cache needs a pipeline with a checkpoint folder")
        parts = ("wanrt-embedding/1", tree_sha256(files.tokenizer), tree_sha256(files.t5),
                 str(pipeline.task.t5.text_len), str(pipeline.text_dtype), prompt)
        key = hashlib.sha256("\0".join(parts).encode()).hexdigest()
        return self.folder / f"{key}.safetensors"

    def get(self, pipeline: Pipeline, prompt: str) -> Tensor | None:
        try:
            return load_file(str(self._path(pipeline, prompt)))[_EMBEDDING_KEY]
        except (SafetensorError, OSError, KeyError):
            return None  # absent, or damaged (then `put` overwrites it)

    def put(self, pipeline: Pipeline, prompt: str, embedding: Tensor) -> None:
        tensor = embedding.detach().float().cpu().contiguous()
        try:
            write_atomic(self._path(pipeline, prompt),
                         lambda tmp: save_file({_EMBEDDING_KEY: tensor}, str(tmp)))
        except OSError:
            pass  # an unwritable cache only costs the next run a T5 load; the run goes on


def text_embeddings(pipeline: Pipeline, request: ResolvedRequest,
                     cache: EmbeddingCache | None) -> tuple[TextEmbeddings, str]:
    """The prompt pair's embeddings and how they were obtained: 'hit', 'miss' or 'off'."""
    if cache is None:
        with phase("T5: encoding the prompts"):
            return pipeline.encode_text(request.prompt, request.negative_prompt), "off"
    cond = cache.get(pipeline, request.prompt)
    uncond = cache.get(pipeline, request.negative_prompt)
    if cond is not None and uncond is not None:
        return TextEmbeddings(cond, uncond), "hit"
    with phase("T5: encoding the prompts"):
        embeddings = pipeline.encode_text(request.prompt, request.negative_prompt)
    cache.put(pipeline, request.prompt, embeddings.cond)
    cache.put(pipeline, request.negative_prompt, embeddings.uncond)
    return embeddings, "miss"


# ---------------------------------------------------------------------- record parts


class _ExpertTimer:
    """Wall time per expert, measured between step callbacks (the first interval also holds
    the conditioning and the expert's load, which `load_seconds` reports on its own)."""

    def __init__(self, forward: Callable[[StepInfo], None] | None) -> None:
        self.forward = forward
        self.seconds: dict[str, float] = defaultdict(float)
        self._last = time.perf_counter()

    def __call__(self, info: StepInfo) -> None:
        now = time.perf_counter()
        self.seconds[info.expert.value] += now - self._last
        self._last = now
        if self.forward is not None:
            self.forward(info)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _host_peak_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def _peak_memory(device: torch.device) -> dict[str, int | None]:
    cuda = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"cuda_max_allocated_bytes": cuda, "host_peak_rss_bytes": _host_peak_rss_bytes()}


def checkpoint_files_used(files: CheckpointFiles) -> list[Path]:
    """The files a generation reads: DiT configs and shards, VAE, T5 and tokenizer."""
    used: list[Path] = []
    for folder in files.dit_dirs.values():
        if folder.is_file():  # a single-file expert (--dit, --dit-high, --dit-low)
            used.append(folder)
            continue
        index = folder / f"{DIT_WEIGHTS_STEM}.safetensors.index.json"
        used += [folder / "config.json", *([index] if index.is_file() else []),
                 *safetensors_shards(folder, DIT_WEIGHTS_STEM)]
    for component in (files.vae, files.t5, files.tokenizer):
        used += files_under(component)
    return used


def _checkpoint_record(files: CheckpointFiles) -> dict[str, Any]:
    root = files.root.resolve()

    def name(path: Path) -> str:
        resolved = path.resolve()
        return resolved.relative_to(root).as_posix() if resolved.is_relative_to(root) else str(resolved)
    return {"folder": str(root), "layout": files.layout.value,
            "formats": {name(path): fmt for path, fmt in component_formats(files).items()},
            "vae": str(files.vae.resolve()),
            "sha256": {name(path): file_sha256(path) for path in checkpoint_files_used(files)}}


def weight_precision(pipeline: Pipeline) -> str:
    """What the DiT weights are stored in: the quantized scheme, else the compute dtype
    (`--precision bf16` means "not quantized", which is float32 on a CPU)."""
    if pipeline.precision != Precision.BF16.value:
        return pipeline.precision
    return short_dtype_name(pipeline.dit_dtype)


def _image_record(image: Tensor | None) -> dict[str, Any] | None:
    """Size and pixel digest of the conditioning image, to tell which image a video used."""
    if image is None:
        return None
    return {"width": image.shape[2], "height": image.shape[1], "float32_sha256": tensor_sha256(image)}


def _video_record(info: VideoInfo) -> dict[str, Any]:
    return {**dataclasses.asdict(info), "path": str(info.path)}


# ---------------------------------------------------------------------- latents file


def save_latents(path: Path, latents: Tensor, task: str, ckpt_dir: Path, sidecar: Mapping[str, Any]) -> None:
    """Final latents plus what `decode_latents` needs to finish the run (the partial sidecar)."""
    metadata = {"format": LATENTS_FORMAT, "task": task, "ckpt_dir": str(ckpt_dir),
                "sidecar": json.dumps(sidecar, ensure_ascii=False)}
    tensor = latents.detach().float().cpu().contiguous()
    write_atomic(Path(path), lambda tmp: save_file({_LATENTS_KEY: tensor}, str(tmp), metadata=metadata))


def save_latents_or_fallback(path: Path, latents: Tensor, task: str, ckpt_dir: Path,
                             sidecar: Mapping[str, Any]) -> Path | None:
    """`save_latents` to `path`, else (a full disk, a folder gone read-only) to the cache
    folder, saying so on stderr; the latents stay in memory for the decode either way, so
    None (neither could be written) still lets the video be written."""
    fallback = cache_root() / "latents" / path.name
    for attempt in (path, fallback):
        try:
            save_latents(attempt, latents, task, ckpt_dir, sidecar)
        except OSError as error:
            _log.warning("could not save the latents to %s (%s)", attempt, error.strerror or error)
            continue
        if attempt == fallback:
            _log.warning("saved the latents to %s instead", fallback)
        return attempt
    return None


def read_latents(path: Path) -> tuple[Tensor, dict[str, str]]:
    """Latents `[C, F, h, w]` and the metadata written by `save_latents`."""
    fix = "pass the .latents.safetensors file written next to the video"
    tensors, metadata = read_wanrt_safetensors(Path(path), LATENTS_FORMAT, f"latents file {path}", fix)
    if _LATENTS_KEY not in tensors or not {"task", "ckpt_dir", "sidecar"} <= set(metadata):
        raise InputError(f"latents file {path} lacks its latents or its run's metadata; {fix}")
    return tensors[_LATENTS_KEY], metadata


# ---------------------------------------------------------------------- runs


def draw_seed(seed: int) -> tuple[int, bool]:
    """(the seed to use, whether it was drawn): a negative seed draws a random one, as the
    official CLI does."""
    if seed < 0:
        return secrets.randbelow(_MAX_SEED + 1), True
    if seed > _MAX_SEED:
        raise InputError(f"--seed {seed} is too large; use 0..{_MAX_SEED}, or -1 for a random one")
    return seed, False


def start_run(pipeline: Pipeline, request, embedding_cache: EmbeddingCache | None,
              resume: SavedSampling | None = None):
    """What every run does first: draw the seed, resolve (validate) the request, check
    every component file the run will load (seconds, not after T5 and sampling), reset the
    peak-memory counter, embed the prompts (a resumed run has them). Returns (resolved,
    seed_was_random, embeddings, embedding cache state, text-encoding seconds)."""
    seed, seed_was_random = draw_seed(request.seed)
    resolved = dataclasses.replace(request, seed=seed).resolved(pipeline.task)
    if pipeline.files is not None:
        pipeline.check_files()
    if pipeline.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(pipeline.device)
    text_start = time.perf_counter()
    if resume is not None:
        embeddings, cache_state = resume.embeddings, "resumed"
    else:
        embeddings, cache_state = text_embeddings(pipeline, resolved, embedding_cache)
    return resolved, seed_was_random, embeddings, cache_state, time.perf_counter() - text_start


def run_sidecar(pipeline: Pipeline, resolved, seed_was_random: bool, fps: int, cache_state: str,
                run_options: Mapping[str, Any] | None, timings: dict[str, Any]) -> dict[str, Any]:
    """The sidecar of a run before its video is written (`resolved` has `settings()`,
    `seed` and `image`); hashing the checkpoint is timed into `timings`."""
    hash_start = time.perf_counter()
    checkpoint = _checkpoint_record(pipeline.files)
    return {
        "wanrt_version": wanrt.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": _device_name(pipeline.device),
        "task": pipeline.task.name,
        "settings": resolved.settings(),
        "seed": resolved.seed,
        "seed_was_random": seed_was_random,
        "fps": fps,
        "runtime": {"device": str(pipeline.device), "dit_dtype": str(pipeline.dit_dtype).removeprefix("torch."),
                    "text_device": str(pipeline.text_device), "embedding_cache": cache_state,
                    "precision": weight_precision(pipeline),
                    "precision_requested": pipeline.requested_precision.value,
                    "quantization": dict(pipeline.quant_summaries),
                    "memory_plan": pipeline.plan.to_dict() if pipeline.plan else None,
                    "streamed_bytes": pipeline.streamed_bytes, "dit_forwards": pipeline.dit_forwards,
                    "step_cache": None if pipeline.step_cache is None else
                    {**pipeline.step_cache.record(resolved.steps), "skipped_steps": list(pipeline.cached_steps)},
                    "loras": pipeline.lora_records()},
        "options": dict(run_options or {}),
        "image": _image_record(resolved.image),
        "checkpoint": checkpoint,
        "timings_s": {**timings, "hashing": time.perf_counter() - hash_start},
    }


def generate_video(pipeline: Pipeline, request: GenerationRequest | ResolvedRequest, output: Path, *,
                   embedding_cache: EmbeddingCache | None,
                   on_step: Callable[[StepInfo], None] | None = None,
                   on_decode: Callable[[], None] | None = None,
                   run_options: Mapping[str, Any] | None = None,
                   sample: Callable[..., Tensor] | None = None,
                   fps: int | None = None,
                   checkpoint_every_s: float | None = None,
                   resume: SavedSampling | None = None) -> GenerationRecord:
    """Sample, save the latents, decode, write `output` (mp4) and its JSON sidecar.

    A negative seed draws a random one (as the official CLI), recorded in the sidecar.
    `run_options` are extra settings to record under "options" (e.g. the official
    `offload_model`, the image path). `sample(resolved, embeddings, on_step=...)` replaces
    `pipeline.sample` (a refine starts from an encoded video); `fps` replaces the task's.
    With `checkpoint_every_s`, sampling is checkpointed (wanrt.resume) at the MoE boundary,
    that often, and on failure; `resume` continues such a checkpoint (`request` is then its).
    Raises `NonFiniteLatentsError` with nothing written if sampling diverges, and
    `DecodeFailedError` naming the saved latents if decoding or writing fails.
    """
    started = time.perf_counter()
    output = check_output_path(output)
    resolved, seed_was_random, embeddings, cache_state, text_seconds = start_run(
        pipeline, request, embedding_cache, resume)
    expert_timer = _ExpertTimer(on_step)
    if checkpoint_every_s is None and resume is None:
        latents = (sample or pipeline.sample)(resolved, embeddings, on_step=expert_timer)
    else:
        state = resumed_state(pipeline, resume) if resume is not None else pipeline.start(resolved)
        checkpointer = SamplingCheckpointer(sampling_state_path_for(output), pipeline, resolved, embeddings, output,
                                            interval_s=checkpoint_every_s or DEFAULT_INTERVAL_S)
        latents = sample_with_checkpoints(pipeline, state, embeddings, checkpointer, on_step=expert_timer)
    sidecar = run_sidecar(pipeline, resolved, seed_was_random, fps or pipeline.task.sample.fps, cache_state,
                          run_options, {"text_encoding": text_seconds, "sampling": dict(expert_timer.seconds)})
    # The video actually generated: an image-conditioned run keeps the image's aspect.
    sidecar["settings"].update(size=output_size(pipeline.task, resolved), requested_size=resolved.size)
    if resume is not None:
        sidecar["resumed_from"] = {"path": str(resume.path.absolute()), "step": resume.step}
    latents_path = save_latents_or_fallback(latents_path_for(output), latents, pipeline.task.name,
                                            pipeline.files.root.resolve(), sidecar)
    if latents_path is not None:  # the final latents supersede any sampling checkpoint
        sampling_state_path_for(output).unlink(missing_ok=True)
    return _decode_and_write(pipeline, latents, output, latents_path, sidecar, started, on_decode)


def decode_latents(latents_path: Path, output: Path | None = None, ckpt_dir: Path | None = None,
                   device: str | torch.device | None = None,
                   on_decode: Callable[[], None] | None = None) -> GenerationRecord:
    """Finish a run from its latents file: decode, write the mp4 (default: the latents'
    name with `.mp4`) and the sidecar. The checkpoint folder defaults to the run's."""
    started = time.perf_counter()
    latents_path = Path(latents_path)
    latents, metadata = read_latents(latents_path)
    sidecar = _copied_sidecar(latents_path, metadata["sidecar"])
    output = check_output_path(output or _free_decode_path(latents_path))
    # A run given `--vae FILE` decodes with that file again, unless another folder is asked for.
    run_vae = sidecar.get("checkpoint", {}).get("vae") if ckpt_dir is None else None
    components = ComponentFiles(vae=Path(run_vae)) if run_vae and is_single_file(Path(run_vae)) else None
    pipeline = Pipeline.from_pretrained(ckpt_dir or metadata["ckpt_dir"], metadata["task"], device=device,
                                        components=components)
    sidecar["decode_run"] = {"ckpt_dir": str(pipeline.files.root.resolve()),
                             "device": _device_name(pipeline.device),
                             "vae_sha256": tree_sha256(pipeline.files.vae),
                             "sampling_record": {"copied_from": str(latents_path.absolute()),
                                                 "latents_sha256": file_sha256(latents_path),
                                                 "verified": False}}
    return _decode_and_write(pipeline, latents, output, latents_path, sidecar, started, on_decode)


def _copied_sidecar(latents_path: Path, text: str) -> dict[str, Any]:
    """The partial sidecar a latents file carries, refused unless it is a JSON object."""
    try:
        sidecar = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        sidecar = None
    if not isinstance(sidecar, dict) or not isinstance(sidecar.get("timings_s", {}), dict):
        raise InputError(f"{latents_path}: its sidecar metadata is not a JSON object; the file was not written "
                         "by `wanrt generate` or was edited")
    sidecar.setdefault("timings_s", {})
    return sidecar


def _free_decode_path(latents_path: Path) -> Path:
    """The run's own `<run>.mp4` beside the latents when neither it nor its sidecar exists
    (the decode it failed), else `<run>_decoded.mp4`, `<run>_decoded_2.mp4`, ...: a decode
    never replaces a video or sidecar unless `--output` names it."""
    stem = latents_path.name.removesuffix(LATENTS_SUFFIX)
    suffixes = itertools.chain(["", "_decoded"], (f"_decoded_{number}" for number in itertools.count(2)))
    outputs = (latents_path.with_name(f"{stem}{suffix}.mp4") for suffix in suffixes)
    return next(path for path in outputs if not path.exists() and not sidecar_path_for(path).exists())


def _decode_and_write(pipeline: Pipeline, latents: Tensor, output: Path, latents_path: Path | None,
                      sidecar: dict[str, Any], started: float,
                      on_decode: Callable[[], None] | None) -> GenerationRecord:
    timings = sidecar["timings_s"]
    sidecar_path = sidecar_path_for(output)
    try:
        if on_decode is not None:
            on_decode()
        decode_start = time.perf_counter()
        video = pipeline.decode(latents)
        timings["decode"] = time.perf_counter() - decode_start
        sidecar["decode"] = pipeline.decode_record()
        write_start = time.perf_counter()
        # Latents files written before the sidecar recorded the fps play at the task's.
        info = write_video(video, output, fps=sidecar.get("fps", pipeline.task.sample.fps))
        timings["write_video"] = time.perf_counter() - write_start
        # Loads of an earlier run (sampling, when this is `wanrt decode`) are kept.
        timings["load"] = {**timings.get("load", {}), **pipeline.load_seconds}
        timings["total"] = time.perf_counter() - started
        sidecar.update(peak_memory=_peak_memory(pipeline.device),
                       latents=str(latents_path) if latents_path is not None else None,
                       video=_video_record(info))
        write_json(sidecar_path, sidecar)
    except Interrupted as interrupt:
        if latents_path is not None:
            interrupt.kept = f"the sampled latents are saved, finish with: wanrt decode {latents_path}"
        raise
    # Whatever failed (VAE out of memory, full disk, a codec error), the sampled latents
    # are safe on disk: say how to finish instead of losing the run.
    except Exception as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if latents_path is None:
            raise DecodeFailedError(f"decoding to {output} failed ({reason}), and the latents could not be "
                                    "saved either (see above); free disk space and run again") from error
        raise DecodeFailedError(f"decoding to {output} failed ({reason}); the sampled latents are saved, "
                                f"finish with: wanrt decode {latents_path}") from error
    return GenerationRecord(output, sidecar_path, latents_path, info, sidecar)
