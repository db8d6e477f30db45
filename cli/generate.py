"""`wanrt generate`: parse the options, validate them before any model loads, then call
`wanrt.generate.generate_video`.

Every option has a wanrt spelling and, where the official Wan2.2 `generate.py` has one, the
official name too (`--frame_num`, `--sample_steps`, `--base_seed`, ...), so official
command lines run unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Mapping, Sequence

import torch
import typer

from wanrt.cli.display import RunDisplay
from wanrt.configs import ModelType
from wanrt.distributed.config import ParallelConfig
from wanrt.distributed.launch import check_gpu_count, is_rank_zero, launched_world_size, relaunch, run_rank
from wanrt.engines.base import EngineKind, use_engine
from wanrt.errors import InputError
from wanrt.generate import (EmbeddingCache, GenerationRecord, check_output_path, default_output_path,
                            generate_video, generation_task, parse_device)
from wanrt.loading.component_files import ComponentFiles
from wanrt.loading.tiny_vae import VAEKind
from wanrt.lora import LoraExpert, LoraSpec
from wanrt.pipelines import GenerationRequest, Pipeline
from wanrt.prompt_extend import (PromptExtendMethod, PromptExtendOptions, PromptExtension, PromptExtensionCache,
                                 TargetLanguage, extend_prompt)
from wanrt.resume import DEFAULT_INTERVAL_S, SavedSampling, read_sampling_state
from wanrt.runtime.attention import AttentionBackend, AttentionReport, attach_attention, check_backend
from wanrt.runtime.planner import PrecisionChoice
from wanrt.runtime.step_cache import StepCacheConfig
from wanrt.video_io import load_image


class ComputeDtype(str, Enum):
    BF16 = "bf16"
    FP32 = "fp32"


COMPUTE_DTYPES = {ComputeDtype.BF16: torch.bfloat16, ComputeDtype.FP32: torch.float32}

VAEOption = Annotated[VAEKind, typer.Option(
    "--vae", help="Decode with the model's VAE (full) or the tiny TAEHV preview VAE (tiny, much faster).")]
TinyVAEOption = Annotated[Path | None, typer.Option(
    "--tiny-vae", help="TAEHV file for --vae tiny (default: taew2_1.pth / taew2_2.pth in --ckpt-dir).")]
# The official `str2bool` spellings.
_TRUE_WORDS = ("yes", "true", "t", "y", "1")
_FALSE_WORDS = ("no", "false", "f", "n", "0")


def parse_guide_scale(text: str | None) -> float | tuple[float, float] | None:
    """'5' applies to both experts; 'low,high' sets the low- and high-noise scales."""
    if text is None:
        return None
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return values
    raise InputError(f"--guide-scale {text!r} must be one number or two as 'low,high' (e.g. 3.0,4.0)")


def parse_step_list(text: str | None) -> tuple[int, ...] | None:
    """'1000,750,500,250' -> (1000, 750, 500, 250)."""
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise InputError(f"--denoising-step-list {text!r} must be integers separated by commas, "
                         "e.g. 1000,750,500,250") from None


def parse_lora_options(both: list[str] | None, high: list[str] | None, low: list[str] | None) -> list[LoraSpec]:
    return [LoraSpec.parse(text, expert) for texts, expert in
            ((both, LoraExpert.BOTH), (high, LoraExpert.HIGH_NOISE), (low, LoraExpert.LOW_NOISE))
            for text in texts or ()]


def parse_vae_option(value: str) -> tuple[VAEKind, Path | None]:
    """`--vae`: `full`, `tiny`, or a VAE file (which decodes in full)."""
    if value in (kind.value for kind in VAEKind):
        return VAEKind(value), None
    return VAEKind.FULL, Path(value)


def parse_official_bool(text: str, flag: str) -> bool:
    if text.lower() in _TRUE_WORDS:
        return True
    if text.lower() in _FALSE_WORDS:
        return False
    raise InputError(f"{flag} {text!r} must be True or False")


def echo_auto_precision(pipeline: Pipeline) -> None:
    """For `--precision auto`, one stderr line: the precision it resolved to, and what decided it."""
    if pipeline.requested_precision is PrecisionChoice.AUTO:
        typer.echo(f"precision auto: {pipeline.precision} ({pipeline.precision_source})", err=True)


# Multi-GPU options of `wanrt generate` and their defaults: the s2v and animate loops run on one GPU.
SINGLE_GPU_DEFAULTS = {"gpus": 1, "ulysses": None, "cfg_parallel": False, "dit_fsdp": False, "t5_fsdp": False,
                       "expert_per_gpu": False}


def refuse_options(options: Mapping[str, Any], task: str, single_gpu_reason: str, not_taken: Sequence[str],
                   not_taken_reason: str, single_gpu: Mapping[str, Any] = SINGLE_GPU_DEFAULTS) -> None:
    """One line for the first option a task family does not run with: a multi-GPU option
    set, an option of `not_taken` given, another VAE, 8-bit attention, or an engine other
    than eager."""
    for name, default in single_gpu.items():
        if options.get(name, default) != default:
            raise InputError(f"--{name.replace('_', '-')} is not supported for {task}: {single_gpu_reason}")
    for name in not_taken:
        if options.get(name):
            raise InputError(f"--{name.removesuffix('_file').replace('_', '-')} {not_taken_reason.format(task=task)}")
    if options["vae"] != VAEKind.FULL.value or options["tiny_vae"] is not None:
        raise InputError(f"--vae {options['vae']} is not supported for {task} yet; leave it out")
    if options["attention"] is not AttentionBackend.SDPA:
        raise InputError(f"--attention {options['attention'].value} is not supported for {task} yet; leave it out")
    if options["engine"] is not EngineKind.EAGER:
        raise InputError(f"--engine {options['engine'].value} is not supported for {task}; leave it out")


def load_image_option(path: Path | None) -> torch.Tensor | None:
    if path is None:
        return None
    try:
        return load_image(path)
    except InputError as error:
        raise InputError(f"--image: {error}") from None


def extended_request(request: GenerationRequest, options: PromptExtendOptions,
                     device: torch.device | None) -> tuple[GenerationRequest, dict[str, Any]]:
    """The request with its prompt extended, and the extension's record for the sidecar."""
    extension = extend_prompt(request.prompt, request.image, options, seed=request.seed, device=device,
                              cache=PromptExtensionCache())
    show_extension(extension)
    return dataclasses.replace(request, prompt=extension.prompt), {"prompt_extend": extension.record()}


# ---------------------------------------------------------------------- display


def show_extension(extension: PromptExtension) -> None:
    """Both prompts on stderr, as the official CLI logs them; a failure is one line."""
    if not extension.extended:
        typer.echo(f"prompt extension failed ({extension.error}); continuing with the original prompt", err=True)
        return
    cached = ", cached" if extension.cache == "hit" else ""
    typer.echo(f"prompt extension: {extension.method.value} {extension.model} "
               f"({extension.target_lang.value}, seed {extension.seed}{cached})", err=True)
    typer.echo(f"original prompt: {extension.original}", err=True)
    typer.echo(f"extended prompt: {extension.prompt}", err=True)


def print_result(record: GenerationRecord) -> None:
    typer.echo(f"video:   {record.video_path.absolute()}")
    typer.echo(f"sidecar: {record.sidecar_path.absolute()}")
    if record.latents_path is not None:
        typer.echo(f"latents: {record.latents_path.absolute()}")
    typer.echo(f"total:   {record.sidecar['timings_s']['total']:.1f} s")
    for expert, summary in record.sidecar["runtime"]["quantization"].items():
        typer.echo(f"quantized {expert}: {summary}")
    for lora in record.sidecar["runtime"]["loras"]:
        skipped = f"; skipped {len(lora['skipped_keys'])} keys of modules Wan2.2 lacks (Wan2.1 image branch)" \
            if lora["skipped_keys"] else ""
        typer.echo(f"lora {lora['expert']}: {lora['file']} x{lora['strength']} ({lora['format']} keys, "
                   f"{lora['patched_parameters']} weights merged{skipped})")
    typer.echo(f"dit forwards: {record.sidecar['runtime']['dit_forwards']}")


def run_generation(pipeline: Pipeline, request: GenerationRequest, output: Path,
                   embedding_cache: EmbeddingCache | None, run_options: Mapping[str, Any],
                   **checkpointing: Any) -> GenerationRecord:
    """`checkpointing`: generate_video's `checkpoint_every_s` and `resume` (one process only)."""
    with RunDisplay(request.resolved(pipeline.task).steps) as display:
        record = generate_video(pipeline, request, output, embedding_cache=embedding_cache,
                                on_step=display.on_step, on_decode=display.on_decode,
                                run_options=run_options, **checkpointing)
    print_result(record)
    return record


# ---------------------------------------------------------------------- command


def torchrun_arguments(ctx: typer.Context, dropped: str) -> list[str]:
    """The command as parsed, in canonical spellings and without option `dropped`: what
    each process started under torchrun is given."""
    arguments = [ctx.info_name]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name == dropped or value is None or value == param.default:
            continue
        if param.is_flag:
            arguments.append(param.opts[0] if value else param.secondary_opts[0])
        elif param.multiple:
            for item in value:
                arguments += [param.opts[0], str(item)]
        else:
            arguments += [param.opts[0], str(value.value if isinstance(value, Enum) else value)]
    return arguments


def generate_command(
    ctx: typer.Context,
    prompt: Annotated[str | None, typer.Option("--prompt", help="What the video shows.")] = None,
    ckpt_dir: Annotated[Path | None, typer.Option(
        "--ckpt-dir", "--ckpt_dir", help="Checkpoint folder (official or diffusers layout).")] = None,
    task: Annotated[str, typer.Option("--task", help="t2v-A14B, i2v-A14B, ti2v-5B or a tiny-* test task.")]
    = "t2v-A14B",
    size: Annotated[str | None, typer.Option(
        "--size", help="WIDTH*HEIGHT, e.g. 1280*720 (default: the task's first size).")] = None,
    frame_num: Annotated[int | None, typer.Option(
        "--frame-num", "--frame_num", help="Frames, 4n+1 (default: the task's).")] = None,
    image: Annotated[Path | None, typer.Option(
        "--image", help="First frame for i2v (required) and ti2v (optional).")] = None,
    negative_prompt: Annotated[str | None, typer.Option(
        "--negative-prompt", help="Default: the official negative prompt.")] = None,
    seed: Annotated[int, typer.Option(
        "--seed", "--base-seed", "--base_seed", help="Noise seed; -1 draws one (recorded in the sidecar).")] = -1,
    solver: Annotated[str | None, typer.Option(
        "--solver", "--sampler", "--sample-solver", "--sample_solver",
        help="unipc, dpm++, euler, or distill: the 4-step sampler of step-distilled models and LoRAs "
        "(LightX2V / Wan2.2-Lightning; defaults to 4 steps, shift 5, guide scale 1).")] = None,
    steps: Annotated[int | None, typer.Option(
        "--steps", "--sample-steps", "--sample_steps", help="Sampling steps (default: the task's).")] = None,
    shift: Annotated[float | None, typer.Option(
        "--shift", "--sample-shift", "--sample_shift", help="Flow-matching shift.")] = None,
    guide_scale: Annotated[str | None, typer.Option(
        "--guide-scale", "--sample-guide-scale", "--sample_guide_scale",
        help="CFG scale: one number, or 'low,high' for the low- and high-noise experts. "
        "1 skips the negative-prompt forward (one DiT forward per step).")] = None,
    denoising_step_list: Annotated[str | None, typer.Option(
        "--denoising-step-list", "--denoising_step_list",
        help="--sampler distill: training steps to sample at (default for 4 steps: 1000,750,500,250).")] = None,
    lora: Annotated[list[str] | None, typer.Option(
        "--lora", metavar="PATH[:STRENGTH]",
        help="LoRA merged into every expert's weights at load (repeatable; they stack). Scale = "
        "strength x alpha / rank, with alpha and rank read from the file; a file without alpha gets "
        "the strength alone (default 1). .safetensors (Wan/ComfyUI, musubi/kohya or diffusers keys), "
        "a PEFT adapter folder, a weights-only .pt/.ckpt, or a Wan2.2-Lightning folder "
        "(high_noise_model/low_noise_model.safetensors: one per expert).")] = None,
    lora_high: Annotated[list[str] | None, typer.Option(
        "--lora-high", metavar="PATH[:STRENGTH]", help="LoRA for the high-noise expert only (A14B; repeatable).")]
    = None,
    lora_low: Annotated[list[str] | None, typer.Option(
        "--lora-low", metavar="PATH[:STRENGTH]", help="LoRA for the low-noise expert only (A14B; repeatable).")]
    = None,
    cache: Annotated[str | None, typer.Option(
        "--cache", metavar="easycache:THRESHOLD[:WARMUP_STEPS]",
        help="Step cache: reuse the last step's residual while EasyCache predicts a small change "
        "(e.g. easycache:0.05; skipped steps are recorded in the sidecar).")] = None,
    offload_model: Annotated[bool, typer.Option(
        "--offload-model", help="Accepted for compatibility and recorded; wanrt manages memory itself.")] = False,
    offload_model_official: Annotated[str | None, typer.Option(
        "--offload_model", metavar="True|False", help="The official spelling, which takes a value.")] = None,
    t5_cpu: Annotated[bool, typer.Option("--t5-cpu", "--t5_cpu", help="Run the text encoder on the CPU.")] = False,
    convert_model_dtype: Annotated[bool, typer.Option(
        "--convert-model-dtype", "--convert_model_dtype",
        help="Accepted and recorded: wanrt always stores the DiT in the compute dtype.")] = False,
    output: Annotated[Path | None, typer.Option(
        "--output", "--save-file", "--save_file", help="Output .mp4 (default: named after task, size, prompt, time).")]
    = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda or cuda:N (default: cuda if present).")]
    = None,
    dtype: Annotated[ComputeDtype | None, typer.Option(
        "--dtype", help="DiT compute dtype (default: bf16 on GPU, fp32 on CPU).")] = None,
    precision: Annotated[PrecisionChoice, typer.Option(
        "--precision", help="DiT weight precision: bf16, fp8/int8 quantized at load time, or auto (per GPU "
        "architecture: fp8 on SM90+, int8 on SM80-89, bf16 on the CPU).")]
    = PrecisionChoice.BF16,
    quantized: Annotated[Path | None, typer.Option(
        "--quantized", help="Folder written by `wanrt quantize`: its experts replace the checkpoint's.")] = None,
    dit_file: Annotated[Path | None, typer.Option(
        "--dit", help="Single-file DiT (ti2v-5B): safetensors (ComfyUI, Kijai, LightX2V; fp16/bf16/fp8/int8) "
        "or GGUF; 8-bit files run as stored.")] = None,
    dit_high: Annotated[Path | None, typer.Option("--dit-high", help="Single-file high-noise expert (A14B).")]
    = None,
    dit_low: Annotated[Path | None, typer.Option("--dit-low", help="Single-file low-noise expert (A14B).")] = None,
    t5_file: Annotated[Path | None, typer.Option(
        "--t5", help="Single-file umt5-xxl encoder (fp16/bf16 or fp8_e4m3fn_scaled safetensors, or .pth).")] = None,
    vram: Annotated[float | None, typer.Option(
        "--vram", help="GPU memory budget in GiB for the memory planner (default: the device's).")] = None,
    ram: Annotated[float | None, typer.Option(
        "--ram", help="Host RAM budget in GiB for the memory planner (default: the machine's).")] = None,
    embedding_cache: Annotated[Path | None, typer.Option(
        "--embedding-cache", help="Prompt-embedding cache folder (default: $WANRT_CACHE_DIR/embeddings).")] = None,
    no_embedding_cache: Annotated[bool, typer.Option(
        "--no-embedding-cache", help="Always run the text encoder.")] = False,
    engine: Annotated[EngineKind, typer.Option(
        "--engine", help="eager, compile (torch.compile of the block), aoti, tensorrt, or auto (the best "
        "available, named on stderr).")] = EngineKind.EAGER,
    engine_dir: Annotated[Path | None, typer.Option(
        "--engine-dir", help="Artifacts written by `wanrt export` (default: build into "
        "$WANRT_CACHE_DIR/engines on first use).")] = None,
    attention: Annotated[AttentionBackend, typer.Option(
        "--attention", help="Self-attention kernel: sdpa (exact), sage (8-bit, guarded per block; CUDA) or "
        "auto (sage on a GPU that runs it, else sdpa).")] = AttentionBackend.SDPA,
    engine_cache_gib: Annotated[float | None, typer.Option(
        "--engine-cache-gib", help="Most disk the engine cache keeps, GiB; least recently used artifacts go first "
        "(default: 64).")] = None,
    gpus: Annotated[int, typer.Option(
        "--gpus", help="Run on N GPUs: re-launches itself under torchrun with the same arguments.")] = 1,
    ulysses: Annotated[int | None, typer.Option(
        "--ulysses", "--ulysses-size", "--ulysses_size",
        help="Ulysses sequence-parallel ranks (default: all the GPUs --cfg-parallel leaves).")] = None,
    cfg_parallel: Annotated[bool, typer.Option(
        "--cfg-parallel", help="Run the prompt and the negative-prompt forwards on two GPUs at once.")] = False,
    dit_fsdp: Annotated[bool, typer.Option(
        "--dit-fsdp", "--dit_fsdp", help="Shard the DiT experts' weights over the GPUs (FSDP2).")] = False,
    t5_fsdp: Annotated[bool, typer.Option(
        "--t5-fsdp", "--t5_fsdp", help="Shard the T5 encoder's weights over the GPUs (FSDP2).")] = False,
    expert_per_gpu: Annotated[bool, typer.Option(
        "--expert-per-gpu", help="A14B on 2 GPUs: the high-noise expert on one, the low-noise one on the other.")]
    = False,
    use_prompt_extend: Annotated[bool, typer.Option(
        "--use-prompt-extend", "--use_prompt_extend",
        help="Rewrite the prompt with a language model first (with --image, an empty prompt is written from "
        "the image).")] = False,
    prompt_extend_method: Annotated[PromptExtendMethod, typer.Option(
        "--prompt-extend-method", "--prompt_extend_method",
        help="dashscope (API; $DASH_API_KEY, $DASH_API_URL) or local_qwen (transformers).")]
    = PromptExtendOptions.method,
    prompt_extend_model: Annotated[str | None, typer.Option(
        "--prompt-extend-model", "--prompt_extend_model",
        help="DashScope model, or a local Qwen2.5(-VL) folder or cached model id (default: qwen-plus/qwen-vl-max, "
        "Qwen2.5_14B/QwenVL2.5_7B).")] = None,
    prompt_extend_target_lang: Annotated[TargetLanguage, typer.Option(
        "--prompt-extend-target-lang", "--prompt_extend_target_lang", help="Language of the extended prompt.")]
    = PromptExtendOptions.target_lang,
    prompt_extend_strict: Annotated[bool, typer.Option(
        "--prompt-extend-strict", help="Stop when prompt extension fails instead of using the original prompt.")]
    = False,
    audio: Annotated[Path | None, typer.Option("--audio", help="s2v: the speech that drives the video.")] = None,
    pose_video: Annotated[Path | None, typer.Option(
        "--pose-video", "--pose_video", help="s2v: a pose (DWPose) video that drives the motion.")] = None,
    num_clip: Annotated[int | None, typer.Option(
        "--num-clip", "--num_clip", help="s2v: clips to generate (default and most: what the audio covers).")]
    = None,
    infer_frames: Annotated[int | None, typer.Option(
        "--infer-frames", "--infer_frames", help="s2v: frames per clip, a multiple of 4 (default 80).")] = None,
    start_from_ref: Annotated[bool, typer.Option(
        "--start-from-ref", "--start_from_ref", help="s2v: start the video from the reference image.")] = False,
    enable_tts: Annotated[bool, typer.Option(
        "--enable-tts", "--enable_tts", help="s2v: synthesize the speech with CosyVoice2 (see README).")] = False,
    tts_prompt_audio: Annotated[Path | None, typer.Option("--tts-prompt-audio", "--tts_prompt_audio")] = None,
    tts_prompt_text: Annotated[str | None, typer.Option("--tts-prompt-text", "--tts_prompt_text")] = None,
    tts_text: Annotated[str | None, typer.Option("--tts-text", "--tts_text")] = None,
    resume: Annotated[Path | None, typer.Option(
        "--resume", help="Continue a stopped run from the .sampling.safetensors file it saved (its prompt, "
        "settings and output are the defaults).")] = None,
    checkpoint_minutes: Annotated[float, typer.Option(
        "--checkpoint-minutes", help="Save the sampling state this often (and at the MoE boundary), to --resume "
        "from.")] = DEFAULT_INTERVAL_S / 60,
    vae: Annotated[str, typer.Option(
        "--vae", help="full (the model's VAE), tiny (the TAEHV preview decoder, much faster; see --tiny-vae), "
        "or a single-file VAE (.safetensors or .pth) in place of the checkpoint's.")] = VAEKind.FULL.value,
    tiny_vae: TinyVAEOption = None,
    src_root_path: Annotated[Path | None, typer.Option(
        "--src_root_path", "--src-root-path", help="animate: the preprocessed folder (src_pose.mp4, src_face.mp4, "
        "src_ref.png; with --replace_flag also src_bg.mp4, src_mask.mp4).")] = None,
    refert_num: Annotated[int | None, typer.Option(
        "--refert_num", "--refert-num", help="animate: frames carried into the next segment, 1 or 5 (default 1).")]
    = None,
    replace_flag: Annotated[bool, typer.Option(
        "--replace_flag", "--replace-flag", help="animate: replace the person in the video instead of "
        "animating the reference image.")] = False,
    use_relighting_lora: Annotated[bool, typer.Option(
        "--use_relighting_lora", "--use-relighting-lora",
        help="animate replacement: merge the checkpoint's relighting_lora.ckpt.")] = False,
) -> None:
    """Generate a video from a prompt (an image for i2v/ti2v; an image and speech for s2v;
    a preprocessed folder for animate)."""
    if not (math.isfinite(checkpoint_minutes) and checkpoint_minutes > 0):
        raise InputError(f"--checkpoint-minutes {checkpoint_minutes} must be a positive number")
    saved = resumed_run(resume, ctx) if resume is not None else None
    if saved is not None:
        task, prompt = saved.task, saved.request.prompt
        ckpt_dir, output = ckpt_dir or Path(saved.ckpt_dir), output or Path(saved.output)
    spec = generation_task(task)
    speech = {"--audio": audio, "--pose_video": pose_video, "--num_clip": num_clip, "--infer_frames": infer_frames,
              "--start_from_ref": start_from_ref or None, "--enable_tts": enable_tts or None,
              "--tts_prompt_audio": tts_prompt_audio, "--tts_prompt_text": tts_prompt_text, "--tts_text": tts_text}
    if spec.dit.model_type is ModelType.S2V:
        from wanrt.cli.s2v import generate_s2v

        return generate_s2v(ctx, spec, speech)
    animate = {"--src_root_path": src_root_path, "--refert_num": refert_num,
               "--replace_flag": replace_flag or None, "--use_relighting_lora": use_relighting_lora or None}
    if spec.dit.model_type is ModelType.ANIMATE:
        from wanrt.cli.animate import generate_animate

        given = [flag for flag, value in speech.items() if value is not None]
        if given:
            raise InputError(f"{', '.join(given)} only apply to s2v tasks, not {task}")
        return generate_animate(ctx, spec, {**animate, "--refert_num": refert_num or 1})
    for flags, family in ((speech, "s2v"), (animate, "animate")):
        given = [flag for flag, value in flags.items() if value is not None]
        if given:
            raise InputError(f"{', '.join(given)} only apply to {family} tasks, not {task}")
    if prompt is None or not (prompt or (use_prompt_extend and image)):
        raise InputError("--prompt is required (it may be empty only with --use_prompt_extend and --image, "
                         "which write it from the image)")
    extend_options = PromptExtendOptions(prompt_extend_method, prompt_extend_model, prompt_extend_target_lang,
                                         prompt_extend_strict) if use_prompt_extend else None
    if extend_options is not None:
        extend_options.check()
    if ckpt_dir is None:
        raise InputError("--ckpt-dir is required: the folder of the downloaded checkpoint")
    vae_kind, vae_file = parse_vae_option(vae)
    components = ComponentFiles(dit_file, dit_high, dit_low, vae_file, t5_file)
    if quantized is not None and (dit_file or dit_high or dit_low):
        raise InputError("--quantized replaces the DiT experts; it cannot be combined with --dit/--dit-high/--dit-low")
    request = saved.request if saved is not None else GenerationRequest(
        prompt=prompt, size=size, frame_num=frame_num, steps=steps, shift=shift,
        guide_scale=parse_guide_scale(guide_scale), solver=solver or spec.sample.solver, seed=seed,
        negative_prompt=negative_prompt, image=load_image_option(image),
        denoising_steps=parse_step_list(denoising_step_list))
    resolved = request.resolved(spec)  # validates every sampling option before anything loads
    loras = parse_lora_options(lora, lora_high, lora_low)
    step_cache = StepCacheConfig.parse(cache) if cache else None
    target = check_output_path(output or default_output_path(spec, resolved))
    offload = (parse_official_bool(offload_model_official, "--offload_model")
               if offload_model_official is not None else offload_model or None)
    world_size = launched_world_size()
    if world_size > 1 and gpus not in (1, world_size):
        raise InputError(f"--gpus {gpus} differs from the {world_size} processes torchrun started; drop --gpus")
    if gpus > 1 and world_size == 1:
        check_gpu_count(gpus, parse_device(device))
    parallel = ParallelConfig.from_options(
        world_size if world_size > 1 else gpus, ulysses, cfg_parallel, dit_fsdp, t5_fsdp,
        expert_per_gpu).check(spec, precision.value, quantized is not None, t5_cpu)
    if parallel.distributed and saved is not None:
        raise InputError("--resume continues a run on one GPU; leave out --gpus/torchrun")
    if parallel.distributed and engine is not EngineKind.EAGER:
        raise InputError(f"--engine {engine.value} runs on one GPU; leave it out with --gpus/torchrun")
    if attention is not AttentionBackend.SDPA and (parallel.distributed or engine is not EngineKind.EAGER):
        raise InputError(f"--attention {attention.value} runs with --engine eager on one GPU; "
                         "leave out --attention, or --engine/--gpus/torchrun")

    def build_pipeline(on_device: torch.device | None, show_plan: bool = True) -> Pipeline:
        pipeline = Pipeline.from_pretrained(ckpt_dir, spec.name, device=on_device,
                                            dtype=COMPUTE_DTYPES[dtype] if dtype else None, t5_cpu=t5_cpu,
                                            vram_gib=vram, ram_gib=ram, precision=precision.value,
                                            quantized_dir=quantized, loras=loras, step_cache=step_cache,
                                            components=components)
        if vae_kind is VAEKind.TINY:
            pipeline.use_tiny_vae(tiny_vae)
        # Refuses a run that cannot fit, before loading; FSDP shards are not what it sizes.
        plan = None if parallel.dit_fsdp else pipeline.plan_run(resolved)
        if show_plan and is_rank_zero():
            echo_auto_precision(pipeline)
            if plan is not None:
                typer.echo("memory plan: " + "; ".join(plan.lines()[2:-1]), err=True)
        return pipeline
    if gpus > 1 and world_size == 1:
        # The checkpoint and the plan are checked here, before launching; rank 0 shows the plan.
        build_pipeline(parse_device(device), show_plan=False)
        raise typer.Exit(relaunch(gpus, torchrun_arguments(ctx, dropped="gpus")))
    cache = None if no_embedding_cache else EmbeddingCache(embedding_cache)
    run_options = {"offload_model": offload, "convert_model_dtype": convert_model_dtype,
                   "image_path": str(image.absolute()) if image else None}
    if parallel.distributed:
        # Imported here: FSDP's modules take half a second to import.
        from wanrt.distributed.generation import run_on_ranks

        run_rank(lambda context: run_on_ranks(
            context, parallel, build_pipeline(context.device), request, ctx.params, run_options,
            lead=lambda leader, agreed, options: run_generation(leader, agreed, target, cache, options),
            prepare=None if extend_options is None else functools.partial(
                extended_request, options=extend_options, device=context.device)), parse_device(device))
    pipeline = build_pipeline(parse_device(device))
    check_backend(attention, pipeline.device)  # before anything loads
    if extend_options is not None:
        # Once the checkpoint is checked, before any weights load (the pipeline loads on first
        # use), so a local Qwen has the memory to itself and is gone when T5 and the DiT load.
        request, extend_record = extended_request(request, extend_options, pipeline.device)
        run_options.update(extend_record)
    run_options["engine"] = use_engine(pipeline, engine, engine_dir, engine_cache_gib).describe()
    if engine is not EngineKind.EAGER:  # what was asked for, and for auto what it picked
        typer.echo(f"engine: {run_options['engine']}", err=True)

    def print_decision(expert: str, report: AttentionReport) -> None:
        typer.echo(f"attention {expert}: {report.summary()}", err=True)
    # Filled in during sampling (each expert's guard decides on its first forward), so the
    # sidecar written after it records the decisions; 8-bit ones are printed too.
    run_options["attention"] = attach_attention(
        pipeline, attention, on_decided=print_decision if attention is not AttentionBackend.SDPA else None)
    run_generation(pipeline, request, target, cache, run_options, checkpoint_every_s=checkpoint_minutes * 60,
                   resume=saved)


# What a resumed run takes from its sampling state, not from the command line.
_SAVED_SETTINGS = ("prompt", "task", "size", "frame_num", "image", "negative_prompt", "seed", "solver", "steps",
                   "shift", "guide_scale", "use_prompt_extend")


def resumed_run(path: Path, ctx: typer.Context) -> SavedSampling:
    """The run `--resume` continues, refusing options that would change what it samples."""
    params = {param.name: param for param in ctx.command.params}
    # By name: Typer may vendor its own click, whose ParameterSource is another enum.
    given = [params[name].opts[0] for name in _SAVED_SETTINGS if ctx.get_parameter_source(name).name != "DEFAULT"]
    if given:
        raise InputError(f"--resume continues the saved run's own settings; drop {', '.join(given)}")
    return read_sampling_state(path)
