"""`wanrt preview`: N cheap candidates of one prompt, a contact sheet and an index to
refine from. Also the sampling/runtime options `wanrt refine` shares with it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from wanrt.cli.generate import (COMPUTE_DTYPES, ComputeDtype, TinyVAEOption, VAEOption, echo_auto_precision,
                                load_image_option, parse_guide_scale)
from wanrt.configs import TaskSpec
from wanrt.errors import InputError
from wanrt.loading.tiny_vae import VAEKind
from wanrt.generate import VIDEO_MODEL_TYPES, EmbeddingCache, generation_task, parse_device
from wanrt.pipelines import GenerationRequest, Pipeline
from wanrt.distributed.launch import is_rank_zero, launched_world_size, run_rank
from wanrt.preview import INDEX_NAME, Ranks, check_preview_folder, preview_request, run_preview
from wanrt.runtime.planner import PrecisionChoice

# Options shared with `wanrt refine`, spelled as `wanrt generate` spells them.
PromptOption = Annotated[str | None, typer.Option("--prompt", help="What the video shows.")]
CkptDirOption = Annotated[Path | None, typer.Option(
    "--ckpt-dir", "--ckpt_dir", help="Checkpoint folder (official or diffusers layout).")]
FrameNumOption = Annotated[int | None, typer.Option("--frame-num", "--frame_num", help="Frames, 4n+1.")]
ImageOption = Annotated[Path | None, typer.Option("--image", help="First frame for i2v (required) and ti2v.")]
NegativePromptOption = Annotated[str | None, typer.Option(
    "--negative-prompt", help="Default: the official negative prompt.")]
SolverOption = Annotated[str | None, typer.Option("--solver", "--sample-solver", help="unipc, dpm++ or euler.")]
StepsOption = Annotated[int | None, typer.Option("--steps", "--sample-steps", help="Sampling steps.")]
ShiftOption = Annotated[float | None, typer.Option("--shift", "--sample-shift", help="Flow-matching shift.")]
GuideScaleOption = Annotated[str | None, typer.Option(
    "--guide-scale", "--sample-guide-scale", help="CFG scale: one number, or 'low,high'.")]
DeviceOption = Annotated[str | None, typer.Option("--device", help="cpu, cuda or cuda:N (default: cuda if present).")]
DtypeOption = Annotated[ComputeDtype | None, typer.Option(
    "--dtype", help="DiT compute dtype (default: bf16 on GPU, fp32 on CPU).")]
PrecisionOption = Annotated[PrecisionChoice, typer.Option(
    "--precision", help="DiT weight precision: bf16, fp8/int8 quantized at load time, or auto (per GPU "
    "architecture: fp8 on SM90+, int8 on SM80-89, bf16 on the CPU).")]
T5CpuOption = Annotated[bool, typer.Option("--t5-cpu", "--t5_cpu", help="Run the text encoder on the CPU.")]
VramOption = Annotated[float | None, typer.Option("--vram", help="GPU memory budget in GiB for the planner.")]
RamOption = Annotated[float | None, typer.Option("--ram", help="Host RAM budget in GiB for the planner.")]
EmbeddingCacheOption = Annotated[Path | None, typer.Option(
    "--embedding-cache", help="Prompt-embedding cache folder (default: $WANRT_CACHE_DIR/embeddings).")]
NoEmbeddingCacheOption = Annotated[bool, typer.Option("--no-embedding-cache", help="Always run the text encoder.")]


@dataclass(frozen=True)
class RuntimeOptions:
    """Where and how the models run (shared by preview and refine)."""

    device: str | None
    dtype: ComputeDtype | None
    t5_cpu: bool
    vram: float | None
    ram: float | None
    precision: PrecisionChoice
    vae: VAEKind = VAEKind.FULL
    tiny_vae: Path | None = None

    def load_pipeline(self, ckpt_dir: Path, task: str, ranks: Ranks = Ranks()) -> Pipeline:
        """Under torchrun each rank runs on its own device (`ranks.context.device`)."""
        device = ranks.context.device if ranks.context is not None else parse_device(self.device)
        pipeline = Pipeline.from_pretrained(ckpt_dir, task, device=device,
                                            dtype=COMPUTE_DTYPES[self.dtype] if self.dtype else None,
                                            t5_cpu=self.t5_cpu, vram_gib=self.vram, ram_gib=self.ram,
                                            precision=self.precision.value)
        if self.vae is VAEKind.TINY:
            pipeline.use_tiny_vae(self.tiny_vae)
        if is_rank_zero():
            echo_auto_precision(pipeline)
        return pipeline


def embedding_cache_option(folder: Path | None, disabled: bool) -> EmbeddingCache | None:
    return None if disabled else EmbeddingCache(folder)


def sampling_request(spec: TaskSpec, prompt: str | None, ckpt_dir: Path | None, *, size: str | None,
                     frame_num: int | None, steps: int | None, shift: float | None, guide_scale: str | None,
                     solver: str | None, seed: int, negative_prompt: str | None,
                     image: Path | None) -> GenerationRequest:
    """The request the sampling options describe, after the checks `wanrt generate` makes."""
    if not prompt:
        raise InputError("--prompt is required")
    if ckpt_dir is None:
        raise InputError("--ckpt-dir is required: the folder of the downloaded checkpoint")
    return GenerationRequest(
        prompt=prompt, size=size, frame_num=frame_num, steps=steps, shift=shift,
        guide_scale=parse_guide_scale(guide_scale), solver=solver or spec.sample.solver, seed=seed,
        negative_prompt=negative_prompt, image=load_image_option(image))


def preview_command(
    prompt: PromptOption = None,
    ckpt_dir: CkptDirOption = None,
    task: Annotated[str, typer.Option("--task", help="t2v-A14B, i2v-A14B, ti2v-5B or a tiny-* test task.")]
    = "t2v-A14B",
    count: Annotated[int, typer.Option("--count", "-n", help="Number of candidates.")] = 4,
    seed: Annotated[int, typer.Option(
        "--seed", "--base-seed", help="Seed of candidate 0; candidate i uses seed+i. -1 draws one.")] = -1,
    size: Annotated[str | None, typer.Option(
        "--size", help="WIDTH*HEIGHT, any multiple of the latent patch (default per task, e.g. 416*240).")]
    = None,
    steps: Annotated[int | None, typer.Option(
        "--steps", "--sample-steps", help="Sampling steps (default per task, e.g. 20).")] = None,
    frame_num: FrameNumOption = None,
    image: ImageOption = None,
    negative_prompt: NegativePromptOption = None,
    solver: SolverOption = None,
    shift: ShiftOption = None,
    guide_scale: GuideScaleOption = None,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Folder for the candidates, contact sheet and index (default: preview_<task>_<time>).")]
    = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    precision: PrecisionOption = PrecisionChoice.BF16,
    t5_cpu: T5CpuOption = False,
    vram: VramOption = None,
    ram: RamOption = None,
    embedding_cache: EmbeddingCacheOption = None,
    no_embedding_cache: NoEmbeddingCacheOption = False,
    expert_per_gpu: Annotated[bool, typer.Option(
        "--expert-per-gpu", help="Under torchrun on 2 GPUs (A14B): one expert per GPU, candidates pipelined.")]
    = False,
    vae: VAEOption = VAEKind.FULL,
    tiny_vae: TinyVAEOption = None,
) -> None:
    """Preview N candidates of one prompt cheaply (low size and steps), to refine the best."""
    spec = generation_task(task, VIDEO_MODEL_TYPES, "wanrt preview")
    request = sampling_request(spec, prompt, ckpt_dir, size=size, frame_num=frame_num, steps=steps, shift=shift,
                               guide_scale=guide_scale, solver=solver, seed=seed,
                               negative_prompt=negative_prompt, image=image)
    resolved = preview_request(spec, request)  # validates every option before anything loads
    if count < 1:
        raise InputError(f"--count {count} must be at least 1")
    runtime = RuntimeOptions(device, dtype, t5_cpu, vram, ram, precision, vae, tiny_vae)
    cache = embedding_cache_option(embedding_cache, no_embedding_cache)

    def preview_on(ranks: Ranks) -> None:
        # One folder for all ranks (a default named by each rank's clock could differ).
        default_folder = Path(f"preview_{spec.name}_{datetime.now():%Y%m%d_%H%M%S}")
        folder = check_preview_folder(ranks.broadcast(out or default_folder))
        pipeline = runtime.load_pipeline(ckpt_dir, spec.name, ranks)

        def announce(index: int, seed: int) -> None:
            typer.echo(f"candidate {index} of {count} (seed {seed}): {resolved.size}, {resolved.steps} steps, "
                       f"{resolved.frame_num} frames", err=True)
        index = run_preview(pipeline, request, count, folder, embedding_cache=cache, ranks=ranks,
                            image_path=image, on_candidate=announce)
        if ranks.rank == 0:
            for candidate in index.candidates:
                typer.echo(f"candidate {candidate.index}: seed {candidate.seed}  "
                           f"{(folder / candidate.video).absolute()}")
            typer.echo(f"contact sheet: {(folder / 'contact_sheet.png').absolute()}")
            typer.echo(f"index:   {(folder / INDEX_NAME).absolute()}")
            typer.echo(f"refine one with: wanrt refine --from {folder} --pick K")
    if expert_per_gpu and not spec.is_moe:
        raise InputError(f"--expert-per-gpu splits the two A14B experts; {spec.name} has one")
    if launched_world_size() > 1:
        run_rank(lambda context: preview_on(Ranks(context, expert_per_gpu)), parse_device(device))  # never returns
    preview_on(Ranks(expert_per_gpu=expert_per_gpu))
