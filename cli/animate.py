"""`wanrt generate --task animate-14B --src_root_path DIR [--refert_num 1|5] [--replace_flag
--use_relighting_lora]`: the official Animate options of `wanrt generate`, checked before any
model loads, then `wanrt.animate_video.generate_animation`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import typer

from wanrt.cli.display import RunDisplay
from wanrt.cli.generate import (COMPUTE_DTYPES, echo_auto_precision, parse_guide_scale, parse_lora_options,
                                parse_official_bool, print_result, refuse_options)
from wanrt.configs import TaskSpec
from wanrt.engines.base import EngineKind
from wanrt.errors import InputError
from wanrt.generate import EmbeddingCache, GenerationRecord, check_output_path, parse_device
from wanrt.pipelines.animate import AnimatePipeline, AnimateRequest

# Options of `wanrt generate` the Animate segment loop does not take: refused, not ignored.
_NOT_FOR_ANIMATE = ("image", "size", "cache", "quantized", "denoising_step_list", "dit_file", "dit_high", "dit_low",
                    "t5_file", "use_prompt_extend", "resume")


def generate_animate(ctx: typer.Context, spec: TaskSpec, animate: Mapping[str, Any]) -> None:
    options = ctx.params
    refuse_options(options, spec.name, "it runs on one GPU", _NOT_FOR_ANIMATE,
                   "does not apply to {task}; its size and length come from --src_root_path")
    if options["ckpt_dir"] is None:
        raise InputError("--ckpt-dir is required: the folder of the downloaded Wan2.2-Animate-14B checkpoint")
    if animate["--src_root_path"] is None:
        raise InputError("--src_root_path is required: the folder written by the official Wan2.2-Animate "
                         "preprocess_data.py")
    if animate["--use_relighting_lora"] and not animate["--replace_flag"]:
        raise InputError("--use_relighting_lora is for character replacement; add --replace_flag")
    request = AnimateRequest(
        replace=bool(animate["--replace_flag"]), refert_num=animate["--refert_num"], clip_len=options["frame_num"],
        steps=options["steps"], shift=options["shift"], guide_scale=parse_guide_scale(options["guide_scale"]),
        solver=options["solver"] or spec.sample.solver, seed=options["seed"], prompt=options["prompt"],
        negative_prompt=options["negative_prompt"])
    request.resolved(spec)  # every sampling option checked before anything loads
    source = Path(animate["--src_root_path"])
    target = check_output_path(options["output"] or Path(f"{spec.name}_{source.name}.mp4"))
    dtype = options["dtype"]
    pipeline = AnimatePipeline.from_pretrained(
        options["ckpt_dir"], spec.name, device=parse_device(options["device"]),
        dtype=COMPUTE_DTYPES[dtype] if dtype else None, t5_cpu=options["t5_cpu"], vram_gib=options["vram"],
        ram_gib=options["ram"], precision=options["precision"].value,
        loras=parse_lora_options(options["lora"], options["lora_high"], options["lora_low"]),
        use_relighting_lora=bool(animate["--use_relighting_lora"]))
    echo_auto_precision(pipeline)
    official_offload = options["offload_model_official"]
    run_options = {
        "offload_model": (parse_official_bool(official_offload, "--offload_model") if official_offload is not None
                          else options["offload_model"] or None),
        "convert_model_dtype": options["convert_model_dtype"], "engine": EngineKind.EAGER.value,
        "use_relighting_lora": bool(animate["--use_relighting_lora"])}
    cache = None if options["no_embedding_cache"] else EmbeddingCache(options["embedding_cache"])
    run_animate(pipeline, request, source, target, cache, run_options)


def run_animate(pipeline: AnimatePipeline, request: AnimateRequest, src_root_path: Path, output: Path,
                cache: EmbeddingCache | None, run_options: Mapping[str, Any]) -> GenerationRecord:
    from wanrt.animate_video import generate_animation

    with RunDisplay(request.resolved(pipeline.task).steps) as display:
        record = generate_animation(pipeline, request, src_root_path, output, embedding_cache=cache,
                                    on_step=display.on_step, run_options=run_options)
    print_result(record)
    return record
