"""DiT forwards per video in each sampling mode, and (on a GPU) end-to-end T2V-A14B 480P
81 frames with a 4-step distill LoRA inside a 24 GiB VRAM cap.

Part 1 runs anywhere on the tiny t2v experts (random weights): the official 40-step CFG
schedule, the same at guide scale 1 (CFG-free), with the EasyCache step cache, and the
4-step distilled sampler with a LoRA; forwards are counted by the pipeline, and the
cached run's error against the uncached one is measured.

Part 2 (on a GPU; on the CPU the tiny model checks the script): both full-size experts
(random bf16) with a random rank-64 Lightning-shaped LoRA on every block Linear of each expert (written to a .safetensors file
and merged at load, as `--lora-high/--lora-low` do), the full Wan2.1 VAE, planned within
`--vram-gib` and streamed, 4 distill steps, decode. Random text embeddings (no T5). The
one-time work (LoRA merge, first-use pinning) is timed apart from sampling + decode.

    python benchmarks/fast_sampling_bench.py --out benchmarks/results/fast_sampling_<device>.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from e2e_stream_bench import random_vae  # noqa: E402
from stream_bench import build_expert  # noqa: E402

from wanrt.bench.harness import vram_cap  # noqa: E402
from wanrt.configs import get_task  # noqa: E402
from wanrt.loading.checkpoint import Expert  # noqa: E402
from wanrt.lora import LoraExpert, LoraSpec  # noqa: E402
from wanrt.pipelines import GenerationRequest, MemoryBudget, Pipeline, TextEmbeddings  # noqa: E402
from wanrt.random_weights import randomize_  # noqa: E402
from wanrt.runtime.step_cache import StepCacheConfig  # noqa: E402

LORA_RANK = 64
DEFAULT_RAM_GIB = 120.0  # the host RAM budget planned within (the GPU machines have 128 GiB)


def write_block_lora(model: torch.nn.Module, path: Path, seed: int) -> None:
    """A rank-64 LoRA on every Linear of the repeated blocks, official key names, alpha = rank."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if name.startswith("blocks.") and isinstance(module, torch.nn.Linear):
            out_features, in_features = module.weight.shape
            key = f"diffusion_model.{name}"
            tensors[f"{key}.lora_down.weight"] = (torch.randn(LORA_RANK, in_features, generator=generator)
                                                  / in_features ** 0.5).to(torch.bfloat16)
            tensors[f"{key}.lora_up.weight"] = (torch.randn(out_features, LORA_RANK, generator=generator)
                                                * 1e-3).to(torch.bfloat16)
            tensors[f"{key}.alpha"] = torch.tensor(float(LORA_RANK))
    save_file(tensors, path)


def embeddings_for(text_dim: int) -> TextEmbeddings:
    g = torch.Generator().manual_seed(0)
    return TextEmbeddings(torch.randn(12, text_dim, generator=g), torch.randn(15, text_dim, generator=g))


def forwards_per_mode(folder: Path, cache_threshold: float) -> list[dict]:
    """Counted DiT forwards of one tiny video per mode (the full task's 40-step schedule)."""
    task = get_task("tiny-t2v")
    official_steps = get_task("t2v-A14B").sample.steps
    experts = {expert: randomize_(build_expert(task.dit, torch.device("cpu")).float(), seed)
               for seed, expert in enumerate((Expert.HIGH_NOISE, Expert.LOW_NOISE))}
    lora = folder / "tiny_lora.safetensors"
    write_block_lora(experts[Expert.HIGH_NOISE], lora, seed=7)
    embeddings = embeddings_for(task.dit.text_dim)
    modes = {
        "official 40 steps, CFG": (GenerationRequest(prompt="", steps=official_steps, seed=0), {}),
        "40 steps, guide scale 1 (CFG-free)": (GenerationRequest(prompt="", steps=official_steps, guide_scale=1.0,
                                                                 seed=0), {}),
        f"40 steps, CFG, easycache:{cache_threshold}": (GenerationRequest(prompt="", steps=official_steps, seed=0),
                                                        {"step_cache": StepCacheConfig.parse(
                                                            f"easycache:{cache_threshold}")}),
        "distill 4 steps + LoRA": (GenerationRequest(prompt="", solver="distill", seed=0),
                                   {"loras": [LoraSpec(lora, 1.0, LoraExpert.BOTH)]}),
    }
    results, uncached = [], None
    for label, (request, options) in modes.items():
        # A LoRA merges in place: every mode starts from the same weights.
        pipeline = Pipeline.from_models(task, copy.deepcopy(experts), loras=options.get("loras", ()))
        pipeline.step_cache = options.get("step_cache")
        latents = pipeline.sample(request, embeddings=embeddings)
        row = {"mode": label, "steps": request.resolved(task).steps, "dit_forwards": pipeline.dit_forwards,
               "cached_steps": pipeline.cached_steps}
        if label == "official 40 steps, CFG":
            uncached = latents
        elif pipeline.step_cache is not None:
            row["relative_l2_error_vs_uncached"] = ((latents - uncached).norm() / uncached.norm()).item()
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def e2e_distill_lora(folder: Path, task_name: str, size: str, frame_num: int | None, device: torch.device,
                     vram_gib: float, ram_gib: float) -> dict:
    """`task_name` (T2V-A14B on a GPU; the tiny t2v model checks the script on the CPU) with
    the 4-step distill sampler and a LoRA per expert merged at load, planned within
    `vram_gib` (on a GPU): the one-time work apart, then the timed 4 steps one by one and
    the decode."""
    cuda = device.type == "cuda"
    task = get_task(task_name)
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    experts = {expert: build_expert(task.dit, device, seed=seed).cpu()
               for seed, expert in enumerate((Expert.HIGH_NOISE, Expert.LOW_NOISE))}
    loras = []
    for seed, (expert, lora_expert) in enumerate(((Expert.HIGH_NOISE, LoraExpert.HIGH_NOISE),
                                                   (Expert.LOW_NOISE, LoraExpert.LOW_NOISE))):
        path = folder / f"lightning_like_{expert.value}.safetensors"
        write_block_lora(experts[expert], path, seed)
        loras.append(LoraSpec(path, 1.0, lora_expert))
    vae = random_vae(task.vae)
    # The cap covers the run, not the building of the experts (each bigger than the cap), and ends with it.
    with vram_cap(device, vram_gib):
        memory = MemoryBudget(vram_gib, ram_gib) if cuda else None
        start = time.perf_counter()
        pipeline = Pipeline.from_models(task, experts, vae=vae, device=device, dtype=torch.bfloat16,
                                        memory=memory, loras=loras)
        merge_seconds = time.perf_counter() - start
        request = GenerationRequest(prompt="", size=size, frame_num=frame_num, solver="distill", seed=0)
        embeddings = embeddings_for(task.dit.text_dim)
        # The first use plans the run and pins the streamed blocks (one-time); a one-step run
        # does that, then the timed run is a fresh 4-step video.
        start = time.perf_counter()
        pipeline.denoise(pipeline.start(request), embeddings, stop=1)
        sync()
        first_use_seconds = time.perf_counter() - start
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        step_ends, step_experts = [], []

        def step_finished(info) -> None:
            sync()
            step_ends.append(time.perf_counter())
            step_experts.append(info.expert.value)

        sampling_start = time.perf_counter()
        state = pipeline.denoise(pipeline.start(request), embeddings, on_step=step_finished)
        latents = state.latents[0].float().cpu()
        sync()
        sampling = time.perf_counter() - sampling_start
        sampling_peak = torch.cuda.max_memory_allocated(device) if cuda else None
        start = time.perf_counter()
        video = pipeline.decode(latents)
        decode = time.perf_counter() - start
    return {"device": torch.cuda.get_device_name(device) if cuda else "CPU (tiny config; checks the script only)",
            "task": task.name, "size": size, "frames": request.resolved(task).frame_num, "sampler": "distill",
            "steps": len(step_ends), "vram_cap_gib": vram_gib if cuda else None,
            "lora_rank": LORA_RANK, "lora_merge_seconds": merge_seconds, "first_use_seconds": first_use_seconds,
            "step_seconds": [end - begin for begin, end in zip([sampling_start, *step_ends[:-1]], step_ends)],
            "step_experts": step_experts,
            "sampling_seconds": sampling, "decode_seconds": decode, "e2e_seconds": sampling + decode,
            "dit_forwards": pipeline.dit_forwards, "sampling_peak_vram_bytes": sampling_peak,
            "peak_vram_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
            "plan": pipeline.plan.to_dict() if pipeline.plan else None,
            "video_finite": bool(torch.isfinite(video).all()), "video_shape": list(video.shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", default="832*480")
    parser.add_argument("--vram-gib", type=float, default=24.0)
    parser.add_argument("--ram-gib", type=float, default=DEFAULT_RAM_GIB)
    parser.add_argument("--cache-threshold", type=float, default=0.5,
                        help="EasyCache threshold for the tiny run (its random experts need more than 0.05)")
    args = parser.parse_args()
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as `wanrt` sets it
    report = {"benchmark": "fast_sampling_bench", "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as folder:
        report["forwards_per_video_tiny"] = forwards_per_mode(Path(folder), args.cache_threshold)
        cuda = torch.cuda.is_available()
        task, size = ("t2v-A14B", args.size) if cuda else ("tiny-t2v", get_task("tiny-t2v").sample.sizes[0])
        report["e2e_distill_lora"] = e2e_distill_lora(Path(folder), task, size, None,
                                                      torch.device("cuda" if cuda else "cpu"), args.vram_gib,
                                                      args.ram_gib)
        print(json.dumps({k: v for k, v in report["e2e_distill_lora"].items() if k != "plan"}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
