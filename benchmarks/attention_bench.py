"""8-bit attention and 8-bit A14B blocks against bf16 SDPA, at the 480P and 720P token counts.

    python benchmarks/attention_bench.py --sweep --out benchmarks/results/attention_<device>.json
    python benchmarks/attention_bench.py --tiny --out /tmp/attention_tiny.json   # CPU script check

Attention alone: one A14B self-attention (40 heads x 128, 32,760 / 75,600 tokens, bf16 inputs
in the DiT's [B, L, N, D] layout): SDPA bf16 (the model's own), wanrt's Triton kernel
(`sage`, int8 QK^T with fp16 P·V, and fp8 P·V on SM89+), and, where installed, the
`sageattention` (PyPI 1.0.6) and `comfy-kitchen` INT8 attention for comparison. Whole block:
`DiTBlock(t2v-A14B)` under bf16 autocast (as quant_bench.py) in bf16 + SDPA, and with every
Linear fp8 or int8 (W8A8) plus the 8-bit attention. Per row: seconds (CUDA events, median of
--iters after --warmup), TFLOP/s, speedup over the bf16 SDPA row of the same scenario, and
the relative L2 / max abs error against it.

`--tiny` runs the tiny config on the CPU with the Triton kernels in the interpreter (slow,
numbers meaningless): it checks the script, nothing else. A GPU run takes < 8 min on an H100.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dit_block_bench import TEXT_LEN, tokens_for
from quant_bench import bf16_block, device_fields, kernels_used, output_error, timed

from wanrt.bench.flops import block_flops
from wanrt.configs import DiTConfig, get_task
from wanrt.export.quantize import Scheme, quantize
from wanrt.models.dit import attention, rope_tables

DTYPE = torch.bfloat16


def attention_flops(seq_len: int, config: DiTConfig) -> int:
    """QK^T and P·V of one self-attention: 2 matmuls x 2 FLOP x L^2 x dim."""
    return 4 * seq_len * seq_len * config.dim


def sage(pv: str):
    from wanrt.kernels.sage_attention import sage_attention

    return functools.partial(sage_attention, pv=pv)


def external_kernels() -> dict:
    """The installed third-party 8-bit attentions, adapted to `(q, k, v, mask) -> [B, L, N, D]`."""
    kernels = {}
    if importlib.util.find_spec("sageattention") is not None:
        from sageattention import sageattn

        # sageattn smooths K in place (k -= mean): it gets a copy.
        kernels["sageattention-pypi"] = lambda q, k, v, mask: sageattn(q, k.clone(), v, tensor_layout="NHD")
    if importlib.util.find_spec("comfy_kitchen") is not None:
        from comfy_kitchen.sage_attention import int8_attention

        kernels["comfy-kitchen-int8"] = lambda q, k, v, mask: int8_attention(
            *(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    return kernels


def attention_variants(device: torch.device) -> dict:
    """Name -> kernel; fp8 P·V only where the GPU has fp8 tensor cores (and never in the
    interpreter, whose float8 casts are wrong)."""
    variants = {"sdpa-bf16": attention, "sage-int8qk-fp16pv": sage("fp16")}
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        variants["sage-int8qk-fp8pv"] = sage("fp8")
    if device.type == "cuda":
        variants.update(external_kernels())
    return variants


# Tile and pipeline variants of wanrt's kernel timed at 480P (--sweep): 8 warps, since ptxas
# reports 4 warps spilling ~660 bytes on sm_90 (tests/kernel_compile_check.py).
SWEEP = [{"block_n": block_n, "num_stages": stages, "num_warps": 8}
         for block_n in (64, 128) for stages in (2, 3, 4)]


def sweep_variants(device: torch.device) -> dict:
    pv = "fp8" if torch.cuda.get_device_capability(device) >= (8, 9) else "fp16"
    return {f"sage-int8qk-{pv}pv bn{c['block_n']} s{c['num_stages']} w{c['num_warps']}": functools.partial(
        sage(pv), **c) for c in SWEEP}


def with_speedups(rows: list[dict]) -> list[dict]:
    baseline = rows[0]["seconds_median"]
    return [{**row, "speedup_vs_bf16_sdpa": baseline / row["seconds_median"]} for row in rows]


def bench_attention(config: DiTConfig, seq_len: int, device: torch.device, warmup: int, iters: int,
                    extra: dict | None = None) -> list[dict]:
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, seq_len, config.num_heads, config.head_dim, generator=gen).to(device, DTYPE)
               for _ in range(3))
    flops = attention_flops(seq_len, config)
    reference = attention(q, k, v)
    rows = []
    for name, kernel in {**attention_variants(device), **(extra or {})}.items():
        try:
            out = kernel(q, k, v, None)
        except Exception as error:  # a third-party kernel that cannot run here is reported, not fatal
            rows.append({"kernel": name, "error": f"{type(error).__name__}: {error}"})
            continue
        timing = timed(lambda kernel=kernel: kernel(q, k, v, None), device, warmup, iters)
        rows.append({"kernel": name, "seq_len": seq_len, **timing,
                     "achieved_tflops": flops / timing["seconds_median"] / 1e12, **output_error(out, reference)})
    timed_rows = [row for row in rows if "error" not in row]
    return with_speedups(timed_rows) + [row for row in rows if "error" in row]


def bench_block(config: DiTConfig, grid: tuple[int, int, int], device: torch.device, warmup: int,
                iters: int) -> list[dict]:
    seq_len = grid[0] * grid[1] * grid[2]
    block = bf16_block(config, device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, seq_len, config.dim, generator=gen).to(device)
    time_mod = (torch.randn(1, 1, 6, config.dim, generator=gen) * 0.1).to(device)
    context = torch.randn(1, TEXT_LEN, config.dim, generator=gen).to(device, DTYPE)
    cos, sin = rope_tables(grid, config.head_dim, seq_len, device=device)

    def forward(candidate):
        with torch.no_grad(), torch.autocast(device.type, dtype=DTYPE):
            return candidate(x, time_mod, context, cos, sin)

    reference = forward(block)
    eight_bit_attention = {name: kernel for name, kernel in attention_variants(device).items()
                           if name.startswith("sage-")}
    # The sage variant with the GPU's best P·V (fp8 where it runs) for the 8-bit blocks.
    best_sage_name, best_sage = list(eight_bit_attention.items())[-1]
    variants = [(Scheme.BF16, "sdpa-bf16", None), (Scheme.BF16, best_sage_name, best_sage),
                (Scheme.FP8, best_sage_name, best_sage), (Scheme.INT8, best_sage_name, best_sage)]
    flops = block_flops(config, seq_len, TEXT_LEN)
    rows = []
    for scheme, attention_name, kernel in variants:
        candidate = block if scheme is Scheme.BF16 else quantize(copy.deepcopy(block), scheme)
        if kernel is not None:
            candidate.self_attn.attention_kernel = kernel  # the model's hook point
        timing = timed(lambda c=candidate: forward(c), device, warmup, iters)
        rows.append({"linears": scheme.value, "attention": attention_name, "grid_fhw": list(grid),
                     "seq_len": seq_len, **timing, "achieved_tflops": flops / timing["seconds_median"] / 1e12,
                     "block_tflop": flops / 1e12, "linear_kernels": kernels_used(candidate, device),
                     **output_error(forward(candidate), reference)})
        vars(candidate.self_attn).pop("attention_kernel", None)  # back to SDPA (the bf16 block is reused)
        del candidate
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return with_speedups(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="tiny config on the CPU through Triton's interpreter")
    parser.add_argument("--sweep", action="store_true", help="also time tile/pipeline variants of the kernel at 480P")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        parser.error("no CUDA device: run with --tiny to check the script on the CPU")
    if args.iters < (1 if args.tiny else 10):
        parser.error("--iters must be at least 10 (the median of >= 10 runs is reported)")
    if args.tiny:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel modules are first imported
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        task = get_task("t2v-A14B")
        scenarios = [(label, tokens_for(size, 81, task.vae_stride))
                     for label, size in (("A14B 480P", (832, 480)), ("A14B 720P", (1280, 720)))]
    else:
        task = get_task("tiny-t2v")
        scenarios = [("tiny (CPU interpreter: script check only)", (2, 6, 9))]

    attention_rows, block_rows = [], []
    for index, (label, grid) in enumerate(scenarios):
        seq_len = grid[0] * grid[1] * grid[2]
        extra = sweep_variants(device) if args.sweep and cuda and index == 0 else None
        for row in bench_attention(task.dit, seq_len, device, args.warmup, args.iters, extra):
            attention_rows.append({"scenario": label, **row})
            print(json.dumps(attention_rows[-1]), flush=True)
        for row in bench_block(task.dit, grid, device, args.warmup, args.iters):
            block_rows.append({"scenario": label, **row})
            print(json.dumps(block_rows[-1]), flush=True)

    report = {
        "benchmark": "attention_bench",
        **device_fields(cuda),
        "note": "attention: one A14B self-attention, bf16 q/k/v [1, L, 40, 128], errors vs bf16 SDPA; "
                "block: one A14B block under bf16 autocast, random weights, text_len 512, 'linears' = weight "
                "scheme of every Linear (W8A8 fp8 rowwise _scaled_mm / int8 _int_mm), errors vs the bf16 SDPA "
                "block" + ("" if cuda else "; CPU tiny shapes through the Triton interpreter: script check only"),
        "attention_results": attention_rows,
        "block_results": block_rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
