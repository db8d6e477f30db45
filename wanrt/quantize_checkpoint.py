"""`wanrt quantize`: calibrate, guard and save the quantized experts of a checkpoint.

For each expert the calibration runs real forwards on the task's own inputs: the prompt
and negative prompt encoded by the checkpoint's T5, the initial latents and conditioning
that generation prepares (noise at the requested size; for i2v the mask and VAE-encoded
image `y`, for ti2v with an image the frozen first frame and per-token timesteps), and
timesteps from the part of the default schedule that the expert serves. Layers whose
error exceeds the guard's threshold stay in bf16. The result is one folder per expert in
the official layout plus `quantization.json` (policy, report, source hash), which
`wanrt generate --quantized DIR` loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from wanrt.configs import ModelType
from wanrt.errors import InputError
from wanrt.export.quant_guard import calibrate_and_guard
from wanrt.export.quant_io import save_quantized, source_weights_sha256
from wanrt.export.quantize import DEFAULT_POLICY, QuantReport
from wanrt.loading.checkpoint import Expert, load_dit, locate_checkpoint
from wanrt.pipelines import GenerationRequest, Pipeline
from wanrt.schedulers import make_scheduler


@dataclass(frozen=True)
class QuantizedExpert:
    expert: Expert
    folder: Path
    report: QuantReport


def calibration_timesteps(pipeline: Pipeline, expert: Expert, count: int) -> list[int]:
    """`count` timesteps spread over the default schedule's steps that `expert` runs."""
    sample = pipeline.task.sample
    timesteps = make_scheduler(sample.solver, sample.steps, sample.shift).timesteps.tolist()
    mine = [t for t in timesteps if pipeline.expert_for(t) is expert]
    stride = max(1, len(mine) // count)
    return mine[::stride][:count]


def quantize_checkpoint(pipeline: Pipeline, out: Path, scheme: str, prompt: str, size: str | None = None,
                        frame_num: int = 5, timesteps_per_expert: int = 3, threshold: float | None = None,
                        seed: int = 0, image: Tensor | None = None) -> list[QuantizedExpert]:
    """Quantize every expert of `pipeline`'s checkpoint into `out` (official layout).
    `image` (`[3, H, W]` in [-1, 1]) conditions the calibration: required for i2v."""
    task = pipeline.task
    if task.dit.model_type is ModelType.I2V and image is None:
        raise InputError(f"{task.name} calibrates on an image-conditioned run: pass --image "
                         "(a representative first frame)")
    request = GenerationRequest(prompt=prompt, size=size, frame_num=frame_num, seed=seed,
                                image=image).resolved(task)
    embeddings = pipeline.encode_text(request.prompt, request.negative_prompt)
    # The first latents and DiT extras exactly as generation prepares them.
    state = pipeline.start(request)
    conditioning = state.conditioning
    contexts = [e[None].to(pipeline.device) for e in (embeddings.cond, embeddings.uncond)]
    autocast = pipeline.dit_dtype if pipeline.dit_dtype != torch.float32 else None
    out.mkdir(parents=True, exist_ok=True)
    targets = locate_checkpoint(out, task).dit_dirs
    results = []
    for expert, folder in pipeline.files.dit_dirs.items():
        model = load_dit(folder, expect=task.dit, dtype=pipeline.dit_dtype).to(pipeline.device)
        inputs = [dict(x=state.latents, context=context, y=conditioning.y,
                       timestep=conditioning.timestep(torch.tensor(t, device=pipeline.device)))
                  for t in calibration_timesteps(pipeline, expert, timesteps_per_expert)
                  for context in contexts]
        report = calibrate_and_guard(model, inputs, scheme, DEFAULT_POLICY, threshold, autocast_dtype=autocast)
        save_quantized(model.cpu(), targets[expert], source_weights_sha256(folder))
        results.append(QuantizedExpert(expert, targets[expert], report))
        del model
    return results
