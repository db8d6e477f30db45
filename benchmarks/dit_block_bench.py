"""Time one full-size Wan2.2 DiT block (A14B and 5B) at the 480P/720P token counts.

This is the reference the streaming, quantization and engine work measures itself
against: a resident bf16 block under autocast with the official float32 islands, as the
official code runs it. Random weights; numbers are per block forward of ONE batch item
(the official pipeline runs cond and uncond as two forwards).

    python benchmarks/dit_block_bench.py --out benchmarks/results/dit_block_<device>.json

Without CUDA it runs the tiny config on the CPU and says so (for checking the script).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from wanrt.bench.flops import block_flops
from wanrt.configs import DiTConfig, get_task
from wanrt.models.dit import DiTBlock, rope_tables
from wanrt.random_weights import randomize_

TEXT_LEN = 512


def tokens_for(size: tuple[int, int], frames: int, vae_stride: tuple[int, int, int]) -> tuple[int, int, int]:
    """Latent token grid (F, H, W) after the VAE stride and the 1x2x2 patch."""
    width, height = size
    st, sh, sw = vae_stride
    return (frames - 1) // st + 1, height // sh // 2, width // sw // 2


def time_cuda(fn, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return times


def time_cpu(fn, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def random_block(config: DiTConfig, device: torch.device, dtype: torch.dtype) -> DiTBlock:
    """A random block in `dtype` except the float32 modulation table, as the loader does."""
    with torch.device("meta"):
        block = DiTBlock(config)
    randomize_(block, seed=0, device=device)
    for name, param in block.named_parameters():
        if name != "modulation":
            param.data = param.data.to(dtype)
    return block.eval()


def bench_block(config: DiTConfig, grid: tuple[int, int, int], device: torch.device, dtype: torch.dtype,
                warmup: int, iters: int) -> dict:
    seq_len = grid[0] * grid[1] * grid[2]
    block = random_block(config, device, dtype)
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(1, seq_len, config.dim, generator=gen).to(device)
    time_mod = (torch.randn(1, 1, 6, config.dim, generator=gen) * 0.1).to(device)
    context = torch.randn(1, TEXT_LEN, config.dim, generator=gen).to(device, dtype)
    cos, sin = rope_tables(grid, config.head_dim, seq_len, device=device)

    def forward():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
            return block(x, time_mod, context, cos, sin)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        times = time_cuda(forward, warmup, iters)
        peak_extra = torch.cuda.max_memory_allocated() - base
    else:
        times = time_cpu(forward, warmup, iters)
        peak_extra = None
    out = forward()
    flops = block_flops(config, seq_len, TEXT_LEN)
    median = sorted(times)[len(times) // 2]
    return {
        "grid_fhw": list(grid), "seq_len": seq_len, "dtype": str(dtype).removeprefix("torch."),
        "block_seconds_median": median, "block_seconds_min": min(times), "iters": iters,
        "block_tflop": flops / 1e12, "achieved_tflops": flops / median / 1e12,
        "expert_forward_seconds_est": median * config.num_layers,
        "activation_peak_bytes": peak_extra, "output_finite": bool(torch.isfinite(out).all()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    scenarios = []
    if cuda:
        a14b, ti2v = get_task("t2v-A14B"), get_task("ti2v-5B")
        for label, task, size in (("A14B 480P", a14b, (832, 480)), ("A14B 720P", a14b, (1280, 720)),
                                  ("5B 720P", ti2v, (1280, 704))):
            grid = tokens_for(size, 81 if task is a14b else 121, task.vae_stride)
            scenarios.append((label, task.dit, grid))
        dtype = torch.bfloat16
    else:
        tiny = get_task("tiny-t2v")
        scenarios.append(("tiny (CPU check only)", tiny.dit, (3, 8, 8)))
        dtype = torch.bfloat16

    results = []
    for label, config, grid in scenarios:
        result = bench_block(config, grid, device, dtype, warmup=3, iters=args.iters)
        result["scenario"] = label
        results.append(result)
        print(json.dumps(result))
        if cuda:
            torch.cuda.empty_cache()

    report = {
        "benchmark": "dit_block_bench",
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or 'unknown'})",
        "cuda_only_numbers": cuda,
        "torch": torch.__version__,
        "attention": "torch.nn.functional.scaled_dot_product_attention",
        "note": "resident bf16 block under autocast, float32 modulation/residual as in the official code; "
                "random weights; one batch item; text_len 512",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
