"""`wanrt generate --task s2v-14B`: the speech-to-video options of `wanrt generate`, checked
before any model loads, then `wanrt.s2v_generate.generate_s2v_video`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import typer

from wanrt.cli.display import RunDisplay
from wanrt.cli.generate import (COMPUTE_DTYPES, SINGLE_GPU_DEFAULTS, echo_auto_precision, load_image_option,
                                parse_guide_scale, parse_official_bool, print_result, refuse_options)
from wanrt.configs import TaskSpec
from wanrt.engines.base import EngineKind
from wanrt.errors import InputError
from wanrt.generate import EmbeddingCache, check_output_path, default_output_path, parse_device
from wanrt.pipelines.s2v import S2VPipeline, S2VRequest

# The official --enable_tts runs CosyVoice2 from a git clone; PyPI's `cosyvoice` (0.0.8, a
# third-party fork) ships only an API wrapper without `cosyvoice.cli`, so it cannot serve it.
TTS_REFUSAL = ("--enable_tts needs CosyVoice2, which no PyPI package provides (PyPI's `cosyvoice` 0.0.8 "
               "lacks cosyvoice.cli); synthesize the speech with CosyVoice2 "
               "(github.com/FunAudioLLM/CosyVoice, model CosyVoice2-0.5B) and pass the wav as --audio")
# Options of `wanrt generate` that the s2v clip loop does not run with.
_SINGLE_GPU_ONLY = {**SINGLE_GPU_DEFAULTS, "frame_num": None}
# Options of `wanrt generate` the s2v path does not take yet: refused rather than ignored.
_NOT_FOR_S2V = ("lora", "lora_high", "lora_low", "cache", "denoising_step_list", "dit_file", "dit_high", "dit_low",
                "t5_file", "use_prompt_extend", "resume")


def generate_s2v(ctx: typer.Context, spec: TaskSpec, speech: Mapping[str, Any]) -> None:
    options = ctx.params
    if speech["--enable_tts"]:
        raise InputError(TTS_REFUSAL)
    refuse_options(options, spec.name, "it runs on one GPU, its clip length is --infer_frames", _NOT_FOR_S2V,
                   "is not supported for {task} yet; leave it out", single_gpu=_SINGLE_GPU_ONLY)
    if not options["prompt"]:
        raise InputError("--prompt is required")
    if options["ckpt_dir"] is None:
        raise InputError("--ckpt-dir is required: the folder of the downloaded checkpoint")
    if options["image"] is None:
        raise InputError(f"{spec.name} needs --image: the reference image of the speaker")
    if speech["--audio"] is None:
        raise InputError(f"{spec.name} needs --audio: the speech file that drives the video")
    request = S2VRequest(
        prompt=options["prompt"], image=load_image_option(options["image"]), audio=speech["--audio"],
        pose_video=speech["--pose_video"], num_clip=speech["--num_clip"], infer_frames=speech["--infer_frames"],
        size=options["size"], steps=options["steps"], shift=options["shift"],
        guide_scale=parse_guide_scale(options["guide_scale"]), solver=options["solver"] or spec.sample.solver,
        seed=options["seed"], negative_prompt=options["negative_prompt"],
        start_from_ref=bool(speech["--start_from_ref"]))
    resolved = request.resolved(spec)  # every sampling option checked before anything loads
    target = check_output_path(options["output"] or default_output_path(spec, resolved))
    dtype = options["dtype"]
    pipeline = S2VPipeline.from_pretrained(
        options["ckpt_dir"], spec.name, device=parse_device(options["device"]),
        dtype=COMPUTE_DTYPES[dtype] if dtype else None, t5_cpu=options["t5_cpu"], vram_gib=options["vram"],
        ram_gib=options["ram"], precision=options["precision"].value, quantized_dir=options["quantized"])
    echo_auto_precision(pipeline)
    plan = pipeline.plan_run(resolved)
    if plan is not None:
        typer.echo("memory plan: " + "; ".join(plan.lines()[2:-1]), err=True)
    official_offload = options["offload_model_official"]
    run_options = {
        "offload_model": (parse_official_bool(official_offload, "--offload_model") if official_offload is not None
                          else options["offload_model"] or None),
        "convert_model_dtype": options["convert_model_dtype"],
        "image_path": str(Path(options["image"]).absolute()), "engine": EngineKind.EAGER.value}
    cache = None if options["no_embedding_cache"] else EmbeddingCache(options["embedding_cache"])
    run_s2v(pipeline, request, target, cache, run_options)


def run_s2v(pipeline: S2VPipeline, request: S2VRequest, output: Path, cache: EmbeddingCache | None,
            run_options: Mapping[str, Any]) -> None:
    from wanrt.s2v_generate import generate_s2v_video

    display = RunDisplay(request.resolved(pipeline.task).steps)
    with display:
        record = generate_s2v_video(
            pipeline, request, output, embedding_cache=cache, on_step=display.on_step,
            on_clip=lambda clip, clips: typer.echo(f"clip {clip + 1}/{clips}", err=True),
            run_options=run_options)
    print_result(record)
