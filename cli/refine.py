"""`wanrt refine`: a preview candidate (`--from DIR --pick K`) or any video (`--init-video`)
brought to full quality: encoded, noised to `--strength`, and sampled over the rest of the
task's full schedule (see wanrt.refine)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wanrt.cli.display import RunDisplay
from wanrt.cli.generate import print_result
from wanrt.cli.preview import (CkptDirOption, DeviceOption, DtypeOption, EmbeddingCacheOption, FrameNumOption,
                               GuideScaleOption, ImageOption, NegativePromptOption, NoEmbeddingCacheOption,
                               PrecisionOption, PromptOption, RamOption, ShiftOption, SolverOption, StepsOption,
                               T5CpuOption, VramOption, RuntimeOptions, embedding_cache_option,
                               sampling_request)
from wanrt.errors import InputError
from wanrt.distributed.launch import launched_world_size
from wanrt.generate import VIDEO_MODEL_TYPES, check_output_path, generation_task
from wanrt.refine import (DEFAULT_STRENGTH, check_strength, read_preview_pick, read_source, refine_request,
                          refine_schedule, refine_video)
from wanrt.runtime.planner import PrecisionChoice


def refine_command(
    from_dir: Annotated[Path | None, typer.Option(
        "--from", help="A folder written by `wanrt preview`; its prompt, seed, task and checkpoint are the defaults.")]
    = None,
    pick: Annotated[int | None, typer.Option("--pick", help="The candidate of --from to refine.")] = None,
    init_video: Annotated[Path | None, typer.Option("--init-video", help="Any video to refine instead.")] = None,
    strength: Annotated[float, typer.Option(
        "--strength", help="Noise level the source is brought to: 0 keeps it, 1 is a new video.")]
    = DEFAULT_STRENGTH,
    prompt: PromptOption = None,
    ckpt_dir: CkptDirOption = None,
    task: Annotated[str | None, typer.Option("--task", help="Default: the preview's, else t2v-A14B.")] = None,
    size: Annotated[str | None, typer.Option(
        "--size", help="Target WIDTH*HEIGHT, an official size (default: the task's first).")] = None,
    frame_num: FrameNumOption = None,
    fps: Annotated[int | None, typer.Option("--fps", help="Output frame rate (default: the source's).")] = None,
    image: ImageOption = None,
    negative_prompt: NegativePromptOption = None,
    seed: Annotated[int | None, typer.Option(
        "--seed", "--base-seed", help="Noise seed (default: the preview candidate's; -1 draws one).")] = None,
    solver: SolverOption = None,
    steps: StepsOption = None,
    shift: ShiftOption = None,
    guide_scale: GuideScaleOption = None,
    output: Annotated[Path | None, typer.Option(
        "--output", help="Output .mp4 (default: refined_<K>_<strength>.mp4 in --from, else <video>_refined_...).")]
    = None,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    precision: PrecisionOption = PrecisionChoice.BF16,
    t5_cpu: T5CpuOption = False,
    vram: VramOption = None,
    ram: RamOption = None,
    embedding_cache: EmbeddingCacheOption = None,
    no_embedding_cache: NoEmbeddingCacheOption = False,
) -> None:
    """Refine a preview candidate or a video at full quality from --strength."""
    if launched_world_size() > 1:
        raise InputError("wanrt refine renders one video on one GPU; run it without torchrun (--gpus 1)")
    strength = check_strength(strength)
    if (from_dir is None) == (init_video is None):
        raise InputError("give --from DIR --pick K (a preview candidate) or --init-video FILE, not both or neither")
    if from_dir is not None:
        if pick is None:
            raise InputError(f"--from {from_dir} needs --pick K, the candidate to refine (see its contact sheet)")
        index, source = read_preview_pick(from_dir, pick)
        settings = index.settings
        task = task or index.task
        ckpt_dir = ckpt_dir or Path(index.ckpt_dir)
        prompt = prompt or settings["prompt"]
        negative_prompt = negative_prompt or settings["negative_prompt"]
        seed = source.preview["seed"] if seed is None else seed
        image = image or (Path(index.image_path) if index.image_path else None)
        default_output = index.folder / f"refined_{pick:02d}_{strength:g}.mp4"
    else:
        if pick is not None:
            raise InputError("--pick chooses a candidate of --from; it does not apply to --init-video")
        source = read_source(init_video)
        default_output = Path(f"{init_video.stem}_refined_{strength:g}.mp4")
    if fps is not None and fps < 1:
        raise InputError(f"--fps {fps} must be at least 1")
    spec = generation_task(task or "t2v-A14B", VIDEO_MODEL_TYPES, "wanrt refine")
    request = sampling_request(spec, prompt, ckpt_dir, size=size, frame_num=frame_num, steps=steps, shift=shift,
                               guide_scale=guide_scale, solver=solver, seed=-1 if seed is None else seed,
                               negative_prompt=negative_prompt, image=image)
    request = refine_request(spec, request, source)
    resolved = request.resolved(spec)  # validates every option before anything loads
    target = check_output_path(output or default_output)
    pipeline = RuntimeOptions(device, dtype, t5_cpu, vram, ram, precision).load_pipeline(ckpt_dir, spec.name)
    schedule = refine_schedule(pipeline, resolved, strength)
    typer.echo(f"refining {source.path} at strength {strength:g}: {schedule.describe()}", err=True)
    with RunDisplay(schedule.total_steps) as display:
        record = refine_video(pipeline, request, source, strength, target,
                              embedding_cache=embedding_cache_option(embedding_cache, no_embedding_cache),
                              fps=fps, on_step=display.on_step, on_decode=display.on_decode)
    print_result(record)
