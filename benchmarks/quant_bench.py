"""bf16 vs fp8 vs int8 on one full-size A14B DiT block and on its largest Linears, in one run.

    python benchmarks/quant_bench.py --out benchmarks/results/quant_<device>.json

Block: `DiTBlock(t2v-A14B)` with random bf16 weights (float32 modulation) under bf16
autocast, as dit_block_bench.py runs it, at the 480P and 720P token counts. Every Linear of
the block is quantized (a bare block has no first/last-block rule). Per scheme: seconds per
block forward (CUDA events, warm-up, median of --iters), TFLOP/s over the block's FLOPs
(the same count for every scheme), weight bytes, the kernel each quantized Linear ran, and
the output error against the bf16 block (relative L2, max abs).

Linears: the FFN's 5120->13824 and 13824->5120 at M=32760 tokens, bf16 nn.Linear vs the
quantized modules (activation quantization included), plus the W8A8 GEMM alone.

Without CUDA it runs the tiny config on the CPU and says so (for checking the script).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
from collections import Counter
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dit_block_bench import TEXT_LEN, block_flops, random_block, time_cpu, time_cuda, tokens_for

from wanrt.configs import DiTConfig, get_task
from wanrt.export.quantize import (
    FP8_DTYPE,
    FP8_MAX,
    INT8_MAX,
    Float8Linear,
    Int8Linear,
    Kernel,
    QuantizedLinear,
    Scheme,
    quantize,
    quantize_rows,
)
from wanrt.models.dit import DiTBlock, rope_tables
from wanrt.random_weights import randomize_

DTYPE = torch.bfloat16
SCHEMES = (Scheme.BF16, Scheme.FP8, Scheme.INT8)
LINEAR_MODULES = {Scheme.FP8: Float8Linear, Scheme.INT8: Int8Linear}


def timed(fn, device: torch.device, warmup: int, iters: int) -> dict:
    times = (time_cuda if device.type == "cuda" else time_cpu)(fn, warmup, iters)
    return {"seconds_median": sorted(times)[len(times) // 2], "seconds_min": min(times), "iters": iters}


def output_error(out: torch.Tensor, reference: torch.Tensor) -> dict:
    diff = out.float() - reference.float()
    # The output's RMS shows that what was timed produced a signal (not zeros or NaN).
    return {"rel_l2_vs_bf16": (diff.norm() / reference.float().norm()).item(),
            "max_abs_vs_bf16": diff.abs().max().item(), "output_rms": out.float().pow(2).mean().sqrt().item()}


def tensor_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def kernels_used(module: nn.Module, device: torch.device) -> dict[str, int]:
    return dict(Counter(m.kernel_for(device).value for m in module.modules() if isinstance(m, QuantizedLinear)))


def bf16_block(config: DiTConfig, device: torch.device) -> DiTBlock:
    return random_block(config, device, DTYPE)


def bench_block(config: DiTConfig, grid: tuple[int, int, int], device: torch.device, warmup: int,
                iters: int, schemes: tuple[Scheme, ...] = SCHEMES) -> list[dict]:
    seq_len = grid[0] * grid[1] * grid[2]
    block = bf16_block(config, device)
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(1, seq_len, config.dim, generator=gen).to(device)
    time_mod = (torch.randn(1, 1, 6, config.dim, generator=gen) * 0.1).to(device)
    context = torch.randn(1, TEXT_LEN, config.dim, generator=gen).to(device, DTYPE)
    cos, sin = rope_tables(grid, config.head_dim, seq_len, device=device)

    def forward(candidate: nn.Module) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device.type, dtype=DTYPE):
            return candidate(x, time_mod, context, cos, sin)

    reference = forward(block)
    flops = block_flops(config, seq_len, TEXT_LEN)
    results = []
    for scheme in schemes:
        candidate = block if scheme is Scheme.BF16 else quantize(copy.deepcopy(block), scheme)
        timing = timed(lambda c=candidate: forward(c), device, warmup, iters)
        results.append({
            "scheme": scheme.value, "grid_fhw": list(grid), "seq_len": seq_len, **timing,
            "achieved_tflops": flops / timing["seconds_median"] / 1e12, "block_tflop": flops / 1e12,
            "weight_bytes": tensor_bytes(candidate), "kernels": kernels_used(candidate, device),
            **output_error(forward(candidate), reference),
        })
        del candidate
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def gemm_only(module: QuantizedLinear, x: torch.Tensor):
    """The W8A8 GEMM of `module` on pre-quantized activations, or None if it dequantizes."""
    kernel = module.kernel_for(x.device)
    if kernel is Kernel.SCALED_MM:
        values, scale = quantize_rows(x, FP8_MAX, FP8_DTYPE)
        return lambda: torch._scaled_mm(values, module.weight.t(), scale_a=scale,
                                        scale_b=module.weight_scale[None, :], out_dtype=DTYPE)
    if kernel is Kernel.INT_MM:
        values, _ = quantize_rows(x, INT8_MAX, torch.int8)
        return lambda: torch._int_mm(values, module.weight.t())
    return None


def bench_linear(in_features: int, out_features: int, rows: int, device: torch.device, warmup: int,
                 iters: int) -> list[dict]:
    with torch.device("meta"):
        linear = nn.Linear(in_features, out_features)
    randomize_(linear, seed=0, device=device)
    linear = linear.to(DTYPE).eval()
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(2)).to(device, DTYPE)
    flops = 2 * rows * in_features * out_features
    with torch.no_grad():
        reference = linear(x)
        results = []
        for scheme in SCHEMES:
            module = LINEAR_MODULES[scheme].from_linear(linear) if scheme in LINEAR_MODULES else linear
            timing = timed(lambda m=module: m(x), device, warmup, iters)
            result = {"scheme": scheme.value, "shape_mkn": [rows, in_features, out_features], **timing,
                      "achieved_tflops": flops / timing["seconds_median"] / 1e12,
                      **output_error(module(x), reference)}
            if isinstance(module, QuantizedLinear):
                result["kernel"] = module.kernel_for(device).value
                gemm = gemm_only(module, x)
                if gemm is not None:
                    gemm_timing = timed(gemm, device, warmup, iters)
                    result["gemm_only_seconds_median"] = gemm_timing["seconds_median"]
                    result["gemm_only_tflops"] = flops / gemm_timing["seconds_median"] / 1e12
            results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    if args.iters < 10:
        parser.error("--iters must be at least 10 (the median of >= 10 runs is reported)")

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        task = get_task("t2v-A14B")
        config = task.dit
        scenarios = [(label, tokens_for(size, 81, task.vae_stride))
                     for label, size in (("A14B 480P", (832, 480)), ("A14B 720P", (1280, 720)))]
        linear_rows = scenarios[0][1][0] * scenarios[0][1][1] * scenarios[0][1][2]  # 32,760
    else:
        config = get_task("tiny-t2v").dit
        scenarios = [("tiny (CPU check only)", (3, 8, 8))]
        linear_rows = 3 * 8 * 8
    linear_shapes = ((config.dim, config.ffn_dim), (config.ffn_dim, config.dim))

    block_results = []
    for label, grid in scenarios:
        for result in bench_block(config, grid, device, args.warmup, args.iters):
            result["scenario"] = label
            block_results.append(result)
            print(json.dumps(result))
    linear_results = []
    for in_features, out_features in linear_shapes:
        for result in bench_linear(in_features, out_features, linear_rows, device, args.warmup, args.iters):
            linear_results.append(result)
            print(json.dumps(result))

    report = {
        "benchmark": "quant_bench",
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or 'unknown'})",
        "cuda_only_numbers": cuda,
        "compute_capability": list(torch.cuda.get_device_capability()) if cuda else None,
        "torch": torch.__version__,
        "note": "one A14B block (every Linear quantized) under bf16 autocast, random weights, one batch "
                "item, text_len 512; errors are against the bf16 block/Linear; fp8 = e4m3 per-channel "
                "weights + dynamic per-token e4m3 activations (torch._scaled_mm rowwise), int8 = per-channel "
                "weights + dynamic per-token int8 activations (torch._int_mm); 'kernels' says what ran "
                "('dequant' = weight-only fallback)" + ("" if cuda else "; CPU tiny shapes: script check only"),
        "block_results": block_results,
        "linear_results": linear_results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
