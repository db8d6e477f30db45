"""End-to-end T2V-A14B sampling + VAE decode inside a VRAM cap, planned and streamed.

Both full-size experts (random weights, bf16) and the full-size Wan2.1 VAE go through
`wanrt.pipelines.Pipeline` exactly as `wanrt generate` runs them: the memory planner picks
the resident/streamed split for the budget, the block streamer copies the rest per step,
one expert is on the device at a time, the DiT leaves before the decode. Text embeddings
are random (no T5), which is the only part of a real run left out.

    python benchmarks/e2e_stream_bench.py --steps 4 --out benchmarks/results/e2e_stream_<device>.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from stream_bench import build_expert  # noqa: E402

from wanrt.configs import get_task  # noqa: E402
from wanrt.loading.checkpoint import Expert  # noqa: E402
from wanrt.models.vae import WanVAE  # noqa: E402
from wanrt.pipelines import GenerationRequest, MemoryBudget, Pipeline, TextEmbeddings  # noqa: E402
from wanrt.random_weights import randomize_  # noqa: E402

GIB = 2**30


def random_vae(config) -> WanVAE:
    with torch.device("meta"):
        vae = WanVAE(config)
    return randomize_(vae, seed=3, device="cpu").eval().requires_grad_(False)


def capped_budget(device: torch.device, vram_gib: float, ram_gib: float) -> MemoryBudget | None:
    """On a GPU, cap this process at `vram_gib` and plan within it; None on the CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, vram_gib * GIB / total))
    return MemoryBudget(vram_gib, ram_gib)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", default="832*480")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--vram-gib", type=float, default=24.0)
    parser.add_argument("--ram-gib", type=float, default=120.0)
    args = parser.parse_args()
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as `wanrt` sets it
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    task = get_task("t2v-A14B" if cuda else "tiny-t2v")
    size = args.size if cuda else task.sample.sizes[0]

    # Built on the device (fast random numbers), kept in host memory like loaded weights.
    experts = {expert: build_expert(task.dit, device, seed=seed).cpu()
               for seed, expert in enumerate((Expert.HIGH_NOISE, Expert.LOW_NOISE))}
    vae = random_vae(task.vae)
    memory = capped_budget(device, args.vram_gib, args.ram_gib)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    pipeline = Pipeline.from_models(task, experts, vae=vae, device=device, dtype=torch.bfloat16,
                                    memory=memory)
    g = torch.Generator().manual_seed(0)
    text_dim = task.dit.text_dim
    embeddings = TextEmbeddings(torch.randn(12, text_dim, generator=g), torch.randn(15, text_dim, generator=g))
    # Enough steps from the official 40-step schedule to cross the MoE boundary: the
    # shifted schedule spends its first steps above t=875.
    request = GenerationRequest(prompt="", size=size, steps=args.steps, seed=0)
    step_times, last = [], [time.perf_counter()]

    def on_step(info) -> None:
        sync()
        now = time.perf_counter()
        step_times.append({"step": info.index + 1, "t": info.timestep, "expert": info.expert.value,
                           "seconds": now - last[0]})
        last[0] = now
        print(step_times[-1], flush=True)

    start = time.perf_counter()
    latents = pipeline.sample(request, embeddings=embeddings, on_step=on_step)
    sync()
    sampling = time.perf_counter() - start
    peak_sampling = torch.cuda.max_memory_allocated() if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    video = pipeline.decode(latents)
    decode = time.perf_counter() - start
    peak_decode = torch.cuda.max_memory_allocated() if cuda else None

    report = {
        "benchmark": "e2e_stream_bench",
        "device": torch.cuda.get_device_name() if cuda else "CPU (tiny config; checks the script only)",
        "torch": torch.__version__, "task": task.name, "size": size, "frames": task.sample.frame_num,
        "steps": args.steps, "vram_cap_gib": args.vram_gib if cuda else None,
        "plan": pipeline.plan.to_dict() if pipeline.plan else None,
        "step_seconds": step_times,
        "sampling_seconds": sampling, "decode_seconds": decode,
        "peak_vram_sampling_bytes": peak_sampling, "peak_vram_decode_bytes": peak_decode,
        "streamed_bytes": pipeline.streamed_bytes,
        "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "video_shape": list(video.shape), "video_finite": bool(torch.isfinite(video).all()),
        "note": "random weights and random text embeddings (T5 not run); `steps` is the length "
                "of the schedule (shift 12), so a short run still crosses the MoE boundary",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("plan", "step_seconds")}, indent=1))


if __name__ == "__main__":
    main()
