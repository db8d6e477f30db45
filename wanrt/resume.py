"""Sampling checkpoints: a run that fails or is stopped at step k continues from there.

After every step the sampling state (latents, the scheduler's multistep history, the step)
is copied to host memory; it is written to `<output>.sampling.safetensors` at the MoE
boundary, every `interval_s` seconds, and when sampling fails or is interrupted. The file
also holds what the rest of the run needs and nothing recomputes: the resolved request (its
image too), both prompt embeddings and the conditioning tensors, so `wanrt generate
--resume FILE` loads no T5 and continues bit-identically on the same device and dtype.
The final latents file supersedes it: it is removed once they are saved.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file
from torch import Tensor

from wanrt.errors import InputError, WanrtError
from wanrt.interrupts import Interrupted
from wanrt.loading.files import read_wanrt_safetensors
from wanrt.loading.save import write_atomic
from wanrt.pipelines import (NonFiniteLatentsError, Pipeline, ResolvedRequest, SamplingState, StepInfo,
                             TextEmbeddings)
from wanrt.pipelines.video import _Conditioning
from wanrt.schedulers import Solver

_log = logging.getLogger(__name__)

SAMPLING_STATE_FORMAT = "wanrt-sampling-state/1"
SAMPLING_STATE_SUFFIX = ".sampling.safetensors"
# Written at least this often while sampling (besides the MoE boundary and on failure):
# at most this much sampling is lost to a power cut or a SIGKILL.
DEFAULT_INTERVAL_S = 10 * 60.0
# The conditioning tensors `_Conditioning` may hold besides the latents.
_CONDITIONING_FIELDS = tuple(f.name for f in fields(_Conditioning) if f.name != "latents")


class SamplingFailedError(WanrtError):
    """Sampling stopped on an error; the state of the last finished step is saved."""


def sampling_state_path_for(output: Path) -> Path:
    return Path(output).with_suffix(SAMPLING_STATE_SUFFIX)


@dataclass(frozen=True)
class SavedSampling:
    """A sampling checkpoint as read back: the run to continue and its state at `step`."""

    path: Path
    task: str
    ckpt_dir: str
    output: str
    request: ResolvedRequest
    step: int
    embeddings: TextEmbeddings = field(repr=False)
    latents: Tensor = field(repr=False)                           # [1, C, F, h, w], host
    scheduler: dict[str, Any] = field(repr=False)                 # FlowScheduler.run_state(), host
    conditioning: dict[str, Tensor | None] = field(repr=False)


# ---------------------------------------------------------------------- writing


def _host(value: Any) -> Any:
    """A host copy of a scheduler value (tensors copied, lists of them too)."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, list):
        return [_host(item) for item in value]
    return value


def _flatten_scheduler(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors under `scheduler/<name>[/<i>]`, and a JSON layout saying what each name is."""
    tensors, layout = {}, {}
    for name, value in state.items():
        if isinstance(value, Tensor):
            tensors[f"scheduler/{name}"], layout[name] = value, {"tensor": True}
        elif isinstance(value, list):
            tensors.update({f"scheduler/{name}/{i}": item for i, item in enumerate(value)})
            layout[name] = {"list": len(value)}
        else:
            layout[name] = {"value": value}
    return tensors, layout


class SamplingCheckpointer:
    """The `on_state` hook of `Pipeline.denoise`: keeps a host copy of the latest state and
    writes it to `path` at the MoE boundary and every `interval_s` seconds."""

    def __init__(self, path: Path, pipeline: Pipeline, request: ResolvedRequest, embeddings: TextEmbeddings,
                 output: Path, interval_s: float = DEFAULT_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.pipeline = pipeline
        self.request = request
        self.embeddings = embeddings
        self.output = Path(output)
        self.interval_s = interval_s
        self.clock = clock
        self._last_write = clock()
        self._snapshot: tuple[int, int, Tensor, dict[str, Any]] | None = None
        self._conditioning: dict[str, Tensor] | None = None
        self.written_step: int | None = None

    def __call__(self, state: SamplingState) -> None:
        if self._conditioning is None:  # the same for the whole run: copied once
            self._conditioning = {name: _host(getattr(state.conditioning, name)) for name in _CONDITIONING_FIELDS
                                  if getattr(state.conditioning, name) is not None}
        timesteps = state.scheduler.timesteps.tolist()
        self._snapshot = (state.step, len(timesteps), _host(state.latents), _host(state.scheduler.run_state()))
        at_boundary = (0 < state.step < len(timesteps) and
                       self.pipeline.expert_for(timesteps[state.step]) != self.pipeline.expert_for(
                           timesteps[state.step - 1]))
        if at_boundary or self.clock() - self._last_write >= self.interval_s:
            self.write()

    def write(self) -> bool:
        """Write the latest snapshot; a failed write is reported and sampling goes on."""
        if self._snapshot is None:
            return False
        step, total, latents, scheduler = self._snapshot
        scheduler_tensors, layout = _flatten_scheduler(scheduler)
        tensors = {"latents": latents, "text/cond": self.embeddings.cond.contiguous(),
                   "text/uncond": self.embeddings.uncond.contiguous(), **scheduler_tensors,
                   **{f"conditioning/{name}": tensor for name, tensor in self._conditioning.items()}}
        if self.request.image is not None:
            tensors["request/image"] = self.request.image.detach().float().cpu()
        settings = self.request.settings()
        settings.pop("has_image")
        metadata = {"format": SAMPLING_STATE_FORMAT, "task": self.pipeline.task.name,
                    "ckpt_dir": str(self.pipeline.files.root.resolve()) if self.pipeline.files else "",
                    "output": str(self.output), "step": str(step), "total_steps": str(total),
                    "request": json.dumps(settings, ensure_ascii=False), "scheduler": json.dumps(layout),
                    "dit_dtype": str(self.pipeline.dit_dtype), "device": str(self.pipeline.device)}
        tensors = {name: tensor.contiguous() for name, tensor in tensors.items()}
        try:
            write_atomic(self.path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        except OSError as error:
            _log.warning("could not save the sampling state to %s (%s)", self.path, error.strerror or error)
            return False
        self._last_write = self.clock()
        self.written_step = step
        return True

    def kept(self) -> str | None:
        """Make sure the latest state is on disk; what to tell the user, or None."""
        if self._snapshot is None or (self.written_step != self._snapshot[0] and not self.write()):
            return None
        step, total = self._snapshot[:2]
        return (f"the sampling state after step {step}/{total} is saved, continue with: "
                f"wanrt generate --resume {self.path}")


def sample_with_checkpoints(pipeline: Pipeline, state: SamplingState, embeddings: TextEmbeddings,
                            checkpointer: SamplingCheckpointer,
                            on_step: Callable[[StepInfo], None] | None = None) -> Tensor:
    """`pipeline.denoise` to the end, checkpointed; the final latents `[C, F, h, w]` (float32, host).

    An error or an interrupt after the first step leaves the last finished step on disk and
    says so (a divergence does not: continuing it would diverge again)."""
    try:
        final = pipeline.denoise(state, embeddings, on_step=on_step, on_state=checkpointer)
    except NonFiniteLatentsError:
        raise
    except Interrupted as interrupt:
        interrupt.kept = checkpointer.kept() or interrupt.kept
        raise
    except Exception as error:
        kept = checkpointer.kept()
        if kept is None:
            raise
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise SamplingFailedError(f"sampling failed ({reason}); {kept}") from error
    return final.latents[0].float().cpu()


# ---------------------------------------------------------------------- reading


def read_sampling_state(path: Path) -> SavedSampling:
    """A file written by `SamplingCheckpointer`; InputError naming `--resume` otherwise."""
    path = Path(path)
    tensors, metadata = read_wanrt_safetensors(path, SAMPLING_STATE_FORMAT, f"--resume {path}",
                                               f"pass the {SAMPLING_STATE_SUFFIX} file a stopped run saved")
    try:
        settings, layout = json.loads(metadata["request"]), json.loads(metadata["scheduler"])
        request = ResolvedRequest(
            prompt=settings["prompt"], size=settings["size"], frame_num=int(settings["frame_num"]),
            steps=int(settings["steps"]), shift=float(settings["shift"]),
            guide_scale=tuple(float(scale) for scale in settings["guide_scale"]),
            solver=Solver(settings["solver"]), seed=int(settings["seed"]),
            negative_prompt=settings["negative_prompt"], image=tensors.get("request/image"))
        scheduler = {}
        for name, kind in layout.items():
            if "tensor" in kind:
                scheduler[name] = tensors[f"scheduler/{name}"]
            elif "list" in kind:
                scheduler[name] = [tensors[f"scheduler/{name}/{i}"] for i in range(int(kind["list"]))]
            else:
                scheduler[name] = kind["value"]
        return SavedSampling(
            path, metadata["task"], metadata["ckpt_dir"], metadata["output"], request, int(metadata["step"]),
            TextEmbeddings(tensors["text/cond"], tensors["text/uncond"]), tensors["latents"], scheduler,
            {name: tensors.get(f"conditioning/{name}") for name in _CONDITIONING_FIELDS})
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise InputError(f"--resume {path} is not a readable wanrt sampling state ({error}); "
                         "it was not written by `wanrt generate` or is damaged") from None


def resumed_state(pipeline: Pipeline, saved: SavedSampling) -> SamplingState:
    """The `SamplingState` `saved` holds, on the pipeline's device, ready for `denoise`."""
    if saved.task != pipeline.task.name:
        raise InputError(f"--resume {saved.path} continues a {saved.task} run, not {pipeline.task.name}")
    request = saved.request
    if pipeline.plan is None:
        pipeline.plan_run(request)
    scheduler = pipeline.new_scheduler(request)
    if not 0 < saved.step <= len(scheduler.timesteps):
        raise InputError(f"--resume {saved.path}: step {saved.step} is outside its {request.steps}-step schedule")
    scheduler.load_run_state({name: _to_device(value, pipeline.device) for name, value in saved.scheduler.items()})
    latents = saved.latents.to(pipeline.device)
    conditioning = _Conditioning(latents, **{name: _to_device(tensor, pipeline.device)
                                             for name, tensor in saved.conditioning.items()})
    return SamplingState(request, latents, scheduler, saved.step, conditioning)


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_to_device(item, device) for item in value]
    return value
