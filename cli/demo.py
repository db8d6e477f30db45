"""`wanrt demo`: the whole path (T5 -> sampling -> VAE -> mp4) on a tiny random-weight
checkpoint, on the CPU, in seconds. It proves the install works; the video is noise."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer

from wanrt.cli.animate import run_animate
from wanrt.cli.generate import run_generation
from wanrt.configs import ModelType, TaskSpec, get_task, parse_size
from wanrt.audio import write_wav
from wanrt.cli.s2v import run_s2v
from wanrt.demo import speech_like_audio, write_tiny_animate_checkpoint, write_tiny_checkpoint, write_toy_animate_source
from wanrt.errors import InputError
from wanrt.generate import check_output_path
from wanrt.hashing import cache_root
from wanrt.loading.checkpoint import locate_checkpoint
from wanrt.pipelines import GenerationRequest, Pipeline
from wanrt.pipelines.animate import AnimatePipeline, AnimateRequest
from wanrt.pipelines.s2v import S2VPipeline, S2VRequest

DEMO_TASKS = ("tiny-t2v", "tiny-i2v", "tiny-ti2v", "tiny-s2v", "tiny-animate")
DEMO_SPEECH_SECONDS = 1.0  # two 8-frame clips: the second sees the first as motion frames
# Whole words of the toy tokenizer's vocabulary, so the prompt is not all <unk>.
DEMO_PROMPT = "a cat surfing on the beach at sunset"


def demo_checkpoint(task: TaskSpec) -> Path:
    """`<cache>/demo/<task>`, written once and reused while every component is present."""
    root = cache_root() / "demo" / task.name
    files = locate_checkpoint(root, task) if root.is_dir() else None
    needed = [*(folder / "config.json" for folder in files.dit_dirs.values()), files.vae, files.t5,
              files.tokenizer] if files else []
    if files and "wav2vec" in task.extras:
        needed.append(root / task.extras["wav2vec"] / "config.json")
    animate = task.dit.model_type is ModelType.ANIMATE
    if animate:
        needed += [root / task.extras["clip_checkpoint"], root / task.extras["lora_checkpoint"]]
    if files is None or not all(path.exists() for path in needed):
        (write_tiny_animate_checkpoint if animate else write_tiny_checkpoint)(root, task)
    return root


def animate_demo(spec: TaskSpec, target: Path) -> None:
    """Both Animate modes on a toy source folder: animation, then replacement with the
    relighting LoRA (`<output>-replace.mp4`)."""
    source = write_toy_animate_source(cache_root() / "demo" / f"{spec.name}-source", spec)
    for replace in (False, True):
        output = target if not replace else target.with_name(f"{target.stem}-replace{target.suffix}")
        pipeline = AnimatePipeline.from_pretrained(demo_checkpoint(spec), spec.name, device="cpu",
                                                   use_relighting_lora=replace)
        typer.echo("replace (relighting LoRA):" if replace else "animate:")
        run_animate(pipeline, AnimateRequest(replace=replace, seed=0), source, output, cache=None,
                    run_options={"demo": True})


def gradient_image(task: TaskSpec) -> torch.Tensor:
    """A [3, H, W] image in [-1, 1] at the task's first size: red left to right, green top to bottom."""
    width, height = parse_size(task.sample.sizes[0])
    red = torch.linspace(-1, 1, width).expand(height, width)
    green = torch.linspace(-1, 1, height)[:, None].expand(height, width)
    return torch.stack([red, green, torch.zeros(height, width)])


def demo_command(
    task: Annotated[str, typer.Option("--task", help="tiny-t2v, tiny-i2v, tiny-ti2v, tiny-s2v or tiny-animate.")]
    = "tiny-t2v",
    output: Annotated[Path | None, typer.Option(
        "--output", help="Output .mp4 (default: <cache>/demo/outputs/<task>.mp4, never the working folder).")]
    = None,
) -> None:
    """Smoke-test the install with a tiny random-weight model on the CPU."""
    if task not in DEMO_TASKS:
        raise InputError(f"--task {task!r} has no demo; choose one of {', '.join(DEMO_TASKS)}")
    spec = get_task(task)
    target = check_output_path(output or cache_root() / "demo" / "outputs" / f"{task}.mp4")
    typer.echo(f"wanrt demo: {task} is a random-weight smoke model; the video is noise, "
               "not a real generation. It checks that T5, sampling, the VAE and mp4 writing work.")
    if spec.dit.model_type is ModelType.ANIMATE:
        animate_demo(spec, target)
        return
    image = gradient_image(spec) if spec.dit.model_type is not ModelType.T2V else None
    if spec.dit.model_type is ModelType.S2V:
        # Speech-like test audio (a gliding voiced tone in syllables), carried into the mp4.
        speech = write_wav(speech_like_audio(DEMO_SPEECH_SECONDS), cache_root() / "demo" / "speech.wav")
        pipeline = S2VPipeline.from_pretrained(demo_checkpoint(spec), task, device="cpu")
        run_s2v(pipeline, S2VRequest(prompt=DEMO_PROMPT, image=image, audio=speech, seed=0), target,
                cache=None, run_options={"demo": True})
        return
    pipeline = Pipeline.from_pretrained(demo_checkpoint(spec), task, device="cpu")
    request = GenerationRequest(prompt=DEMO_PROMPT, image=image, seed=0)
    # No embedding cache: the demo always runs the text encoder, the whole path.
    run_generation(pipeline, request, target, embedding_cache=None, run_options={"demo": True})
