"""One full-size A14B DiT block through each engine: eager, torch.compile (regional) and an
AOTInductor package with the block's weights as inputs, bf16 and fp8, at the 480P and 720P
token counts (81 frames).

For each (precision, size): the median block time, the speed-up over eager, the output error
against eager, and the build time (compile: first call; aoti: export + AOTInductor compile).
A package with dynamic shapes over both token counts is timed too, to show what one package
serving every size costs against a package per size. Random weights, one batch item.

    python benchmarks/engine_bench.py --out benchmarks/results/engine_<device>.json

`--tiny` runs the tiny config on the CPU (checks the script; the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dit_block_bench import random_block, time_cpu, time_cuda, tokens_for  # noqa: E402

from wanrt.configs import get_task  # noqa: E402
from wanrt.engines.compiled import compile_blocks  # noqa: E402
from wanrt.export.aoti import build_package, load_package  # noqa: E402
from wanrt.export.quantize import quantize  # noqa: E402
from wanrt.export.specs import Component, block_tensor_names, make_spec  # noqa: E402
from wanrt.models.dit import rope_tables  # noqa: E402


class _Blocks(torch.nn.Module):
    """A one-block holder, so `compile_blocks` (which works on a model's repeated blocks)
    compiles the block exactly as the `compile` engine does."""

    repeated_blocks = "blocks"

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([block])


def block_inputs(config, grid, device, dtype) -> list[torch.Tensor]:
    seq_len = grid[0] * grid[1] * grid[2]
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(1, seq_len, config.dim, generator=gen).to(device)
    time_mod = (torch.randn(1, 1, 6, config.dim, generator=gen) * 0.1).to(device)
    context = torch.randn(1, config.text_len, config.dim, generator=gen).to(device, dtype)
    cos, sin = rope_tables(grid, config.head_dim, seq_len, device=device)
    return [x, time_mod, context, cos, sin]


def weights_of(block) -> list[torch.Tensor]:
    state = block.state_dict(keep_vars=True)
    return [state[name] for name in block_tensor_names(block)]


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


def build_packages(block, task, sizes, device, dynamic: bool, scratch: Path):
    """One static package per size, plus one dynamic package over all of them."""
    builds = {label: ([size], [frames]) for label, (size, frames) in sizes.items()}
    if dynamic:
        builds["dynamic"] = ([s for s, _ in sizes.values()], [f for _, f in sizes.values()])
    packages, seconds = {}, {}
    for label, (size_list, frame_list) in builds.items():
        spec = make_spec(Component.DIT_BLOCK, block, task, size_list, frame_list)
        folder = scratch / label.replace(" ", "_").replace("*", "x")
        folder.mkdir()
        start = time.perf_counter()
        build_package(spec, block, folder, device)
        seconds[label] = time.perf_counter() - start
        packages[label] = load_package(folder, device)
    return packages, seconds


def bench_precision(task, precision: str, sizes, device, iters: int, dynamic: bool) -> list[dict]:
    config, dtype = task.dit, torch.bfloat16
    timer = time_cuda if device.type == "cuda" else time_cpu
    block = random_block(config, device, dtype)
    if precision != "bf16":
        block = quantize(block, precision)  # a lone block: every Linear is quantized
    compiled_block = compile_blocks(_Blocks(copy.deepcopy(block))).blocks[0]

    def run(module, inputs):
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
            return module(*inputs)

    results = []
    with tempfile.TemporaryDirectory(prefix="engine-bench-") as scratch:
        packages, build_seconds = build_packages(block, task, sizes, device, dynamic, Path(scratch))
        for label, (size, frames) in sizes.items():
            grid = tokens_for(tuple(int(v) for v in size.split("*")), frames, task.vae_stride)
            inputs = block_inputs(config, grid, device, dtype)
            weights = weights_of(block)
            reference = run(block, inputs)
            start = time.perf_counter()
            compiled_out = run(compiled_block, inputs)  # the first call at a new token count compiles
            if device.type == "cuda":
                torch.cuda.synchronize()
            compile_seconds = time.perf_counter() - start
            runs = {"eager": lambda: run(block, inputs), "compile": lambda: run(compiled_block, inputs),
                    "aoti": lambda p=packages[label]: p(*inputs, *weights)[0]}
            if dynamic:
                runs["aoti_dynamic"] = lambda p=packages["dynamic"]: p(*inputs, *weights)[0]
            medians = {}
            for name, fn in runs.items():
                times = sorted(timer(fn, warmup=3, iters=iters))
                medians[name] = times[len(times) // 2]
            errors = {"compile": relative_error(compiled_out, reference)}
            errors.update({name: relative_error(fn(), reference) for name, fn in runs.items() if name.startswith("aoti")})
            result = {
                "scenario": label, "precision": precision, "grid_fhw": list(grid),
                "seq_len": grid[0] * grid[1] * grid[2],
                "block_seconds_median": medians,
                "speedup_vs_eager": {k: medians["eager"] / v for k, v in medians.items() if k != "eager"},
                "max_abs_error_relative_to_eager": errors,
                "eager_output_rms": reference.float().pow(2).mean().sqrt().item(),
                "build_seconds": {"compile_first_call": compile_seconds, "aoti": build_seconds[label],
                                  **({"aoti_dynamic": build_seconds["dynamic"]} if dynamic else {})},
            }
            results.append(result)
            print(json.dumps(result), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="tiny config on the CPU: checks the script only")
    parser.add_argument("--precisions", default="bf16,fp8")
    parser.add_argument("--no-dynamic", action="store_true", help="skip the dynamic-shape package")
    args = parser.parse_args()

    if args.tiny:
        task, device = get_task("tiny-t2v"), torch.device("cpu")
        sizes = {"tiny 64*64": ("64*64", 9), "tiny 96*64": ("96*64", 9)}
    else:
        if not torch.cuda.is_available():
            sys.exit("engine_bench needs a CUDA GPU for the full-size block; use --tiny to check the script")
        task, device = get_task("t2v-A14B"), torch.device("cuda")
        sizes = {"A14B 480P": ("832*480", 81), "A14B 720P": ("1280*720", 81)}
    results = []
    for precision in args.precisions.split(","):
        results += bench_precision(task, precision, sizes, device, args.iters, dynamic=not args.no_dynamic)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()

    report = {
        "benchmark": "engine_bench",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or 'unknown'})",
        "tiny_check_only": args.tiny,
        "torch": torch.__version__,
        "note": f"one {task.name} DiT block, random weights, one batch item, text_len {task.dit.text_len}; eager = the block under bf16 autocast; "
                "compile = torch.compile of the block's forward (the `compile` engine); aoti = an AOTInductor "
                "package taking the block's weights as inputs (the `aoti` engine's DIT_BLOCK), one per size, "
                "and aoti_dynamic = one package over both token counts. fp8: e4m3 weights with per-channel "
                "scales, W8A8 through torch._scaled_mm where the GPU has it.",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
