"""Resident vs streamed full-size A14B expert forwards, same precision, same run.

(a) the whole expert resident on the GPU; (b) its 40 blocks in pinned host memory, streamed
through `depth + 1` device slots by `wanrt.runtime.streaming.BlockStreamer` under a 24 GiB
cap (`torch.cuda.set_per_process_memory_fraction`). Reports seconds per forward, the
streaming overhead, the overlap efficiency (copy time hidden / copy time), H2D GB/s, peak
VRAM and host RAM. Random weights, bf16, one batch item, a full-length (512) text context.

    python benchmarks/stream_bench.py --out benchmarks/results/stream_<device>.json

Without CUDA it runs the tiny config on the CPU and says so (a check of the script only).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from dit_block_bench import tokens_for  # noqa: E402

from wanrt.bench.models import random_dit  # noqa: E402
from wanrt.configs import get_task  # noqa: E402
from wanrt.models.dit import WanDiT  # noqa: E402
from wanrt.runtime.streaming import BlockStreamer  # noqa: E402

GIB = 2**30


def build_expert(config, device: torch.device, seed: int = 0) -> WanDiT:
    """bf16 weights with the loader's float32 islands, never materialised in float32."""
    return random_dit(config, seed, device, torch.bfloat16)


def inputs_for(config, grid, device):
    g = torch.Generator(device="cpu").manual_seed(1)
    f, h, w = grid
    x = torch.randn(1, config.in_dim, f, h * 2, w * 2, generator=g).to(device)
    context = torch.randn(1, config.text_len, config.text_dim, generator=g).to(device)
    return x, torch.tensor([937], device=device), context


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vram-gib", type=float, default=24.0)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--forwards", type=int, default=3)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    task = get_task("t2v-A14B" if cuda else "tiny-t2v")
    sizes = {"480P": (832, 480), "720P": (1280, 720)} if cuda else {"tiny": (64, 64)}
    grids = {label: tokens_for(size, task.sample.frame_num, task.vae_stride) for label, size in sizes.items()}

    model = build_expert(task.dit, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    results: dict = {"resident": {}, "streamed": {}}

    def run(label):
        x, t, context = inputs_for(task.dit, grids[label], device)
        with torch.no_grad(), autocast:
            model(x, t, context)

    with torch.no_grad():
        for label in grids:
            run(label)  # warm-up
            times = [timed(lambda: run(label), sync) for _ in range(args.forwards)]
            results["resident"][label] = {"seconds_per_forward": min(times), "all": times}
            print(label, "resident", times, flush=True)

    streamer = BlockStreamer(device, depth=args.depth)
    streamer.register("expert", model)
    if cuda:
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.vram_gib * GIB / total))
        torch.cuda.reset_peak_memory_stats()
    block_bytes = sum(b.nbytes for b in streamer._blocks.values())

    # Pure copy time of one full pass over the blocks, through the same slots.
    slot = streamer._slots[0]
    copy_seconds = timed(lambda: [slot[:b.nbytes].copy_(b.host, non_blocking=True)
                                  for b in streamer._blocks.values()], sync)

    for label in grids:
        streamer.expect_forward("expert")
        run(label)  # warm-up
        times = []
        for _ in range(args.forwards):
            streamer.expect_forward("expert")
            times.append(timed(lambda: run(label), sync))
        resident = results["resident"][label]["seconds_per_forward"]
        streamed = min(times)
        hidden = max(0.0, min(1.0, 1 - (streamed - resident) / copy_seconds))
        results["streamed"][label] = {
            "seconds_per_forward": streamed, "all": times,
            "overhead_vs_resident": streamed / resident - 1,
            "overlap_efficiency": hidden,
        }
        print(label, "streamed", times, flush=True)

    report = {
        "benchmark": "stream_bench",
        "device": torch.cuda.get_device_name() if cuda else "CPU (tiny config; checks the script only)",
        "torch": torch.__version__,
        "task": task.name, "precision": "bf16 weights, float32 modulation/time MLP",
        "grids_fhw": grids, "prefetch_depth": args.depth,
        "vram_cap_gib": args.vram_gib if cuda else None,
        "streamed_block_bytes_per_forward": block_bytes,
        "slot_bytes": streamer.slot_bytes, "slots": args.depth + 1,
        "copy_seconds_per_forward": copy_seconds,
        "h2d_gb_per_s": block_bytes / copy_seconds / 1e9,
        "peak_vram_bytes_streamed": torch.cuda.max_memory_allocated() if cuda else None,
        "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "pinned_host": streamer.pin,
        **results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("resident", "streamed")}))


if __name__ == "__main__":
    main()
