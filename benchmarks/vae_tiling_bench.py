"""Tiled VAE decode (and the tiny TAEHV preview decoder): time, peak memory, error vs untiled.

Two modes:
- default (any machine): the official tiny-width VAEs of tests/fixtures/vae on the CPU, the
  untiled decode against the planner-style tilings, plus a random-weight taew2_1/taew2_2.
  Wall-clock seconds and max/mean abs error against the untiled decode.
- `--full` (CUDA): full-size random-weight VAEs at 720P (Wan2.1 1280x720 81 frames, Wan2.2
  1280x704 121 frames) decoded with the tiling `wanrt.runtime.planner.choose_vae_tiling` picks
  for `--vram` GiB, under `torch.cuda.set_per_process_memory_fraction` of that budget: the
  peak allocated bytes and the tiled-decode time (the issue's GPU figures).

    python benchmarks/vae_tiling_bench.py --out benchmarks/results/vae_tiling_cpu.json
    python benchmarks/vae_tiling_bench.py --full --vram 24 --out benchmarks/results/vae_tiling_h100.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from wanrt.bench.harness import vram_cap
from wanrt.configs import TINY_WAN21_VAE, TINY_WAN22_VAE, WAN21_VAE, WAN22_VAE, VAEConfig
from wanrt.loading.checkpoint import load_vae
from wanrt.models.tiny_vae import TinyVAE, TinyVAEConfig
from wanrt.models.vae import WanVAE
from wanrt.random_weights import randomize_
from wanrt.runtime.planner import GIB, choose_vae_tiling
from wanrt.runtime.vae_tiling import TiledVAE, VAETiling

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "vae"


def _timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def _errors(out: torch.Tensor, reference: torch.Tensor) -> dict:
    diff = (out.float().cpu() - reference.float().cpu()).abs()
    return {"max_abs_error": diff.max().item(), "mean_abs_error": diff.mean().item()}


def cpu_scenarios() -> list[dict]:
    results = []
    latent_hw, latent_frames = 16, 3
    tiny_files = {"wan2_1": (TINY_WAN21_VAE, WAN21_VAE, "Wan2.1_VAE_tiny.pth", 1),
                  "wan2_2": (TINY_WAN22_VAE, WAN22_VAE, "Wan2.2_VAE_tiny.pth", 2)}
    for name, (config, full_config, file, patch) in tiny_files.items():
        vae = load_vae(FIXTURES / name / file, config)
        latent = torch.randn(1, config.z_dim, latent_frames, latent_hw, latent_hw,
                             generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            reference, untiled_s = _timed(lambda: vae.decode(latent), torch.device("cpu"))
            results.append({"scenario": f"{name} tiny-width VAE untiled", "seconds": untiled_s,
                            "output_shape": list(reference.shape)})
            for tiling in (VAETiling(10, 10, 4), VAETiling(8, 8, 2), VAETiling(12, 12, 8)):
                out, seconds = _timed(lambda: TiledVAE(vae, tiling).decode(latent), torch.device("cpu"))
                results.append({"scenario": f"{name} tiny-width VAE tiled", "tiling": tiling.__dict__,
                                "tiles": tiling.count(latent_hw, latent_hw), "seconds": seconds,
                                **_errors(out, reference)})
            tiny = randomize_(TinyVAE(TinyVAEConfig(config.z_dim, patch, full_config.latent_mean,
                                                    full_config.latent_std)), seed=0, device="cpu").eval()
            out, seconds = _timed(lambda: tiny.decode(latent), torch.device("cpu"))
            results.append({"scenario": f"{name} TAEHV (random weights, full width)", "seconds": seconds,
                            "output_shape": list(out.shape)})
        for result in results[-5:]:
            print(json.dumps(result), flush=True)
    return results


def capped_tiled_decode(config: VAEConfig, width: int, height: int, frames: int, vram_gib: float,
                        device: torch.device) -> dict:
    """One decode of random latents by a random-weight `config` VAE, tiled as
    `choose_vae_tiling` picks for `vram_gib` and run under that cap (on a GPU): time, peak
    allocated bytes (GPU) and the planner's predicted peak."""
    with torch.device("meta"):
        vae = WanVAE(config)
    vae = randomize_(vae, seed=0, device=device).eval()
    stride = config.stride[1]
    latent_hw = (height // stride, width // stride)
    tiling, predicted = choose_vae_tiling(config, latent_hw, int(vram_gib * GIB))
    latent = torch.randn(1, config.z_dim, (frames - 1) // 4 + 1, *latent_hw, device=device)
    decoder = TiledVAE(vae, tiling, output_device="cpu") if tiling else vae
    cuda = device.type == "cuda"
    with vram_cap(device, vram_gib), torch.no_grad():
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        out, seconds = _timed(lambda: decoder.decode(latent), device)
        peak = torch.cuda.max_memory_allocated(device) if cuda else None
    return {"scenario": f"Wan{config.version.value} VAE fp32 {width}x{height} {frames} frames decode",
            "vram_cap_gib": vram_gib, "tiling": tiling.__dict__ if tiling else None,
            "tiles": tiling.count(*latent_hw) if tiling else 1, "seconds": seconds,
            "peak_allocated_bytes": peak, "predicted_peak_bytes": predicted, "output_shape": list(out.shape),
            "output_finite": bool(torch.isfinite(out).all()), "output_abs_max": out.abs().max().item()}


def gpu_scenarios(vram_gib: float) -> list[dict]:
    results = []
    for config, (width, height, frames) in ((WAN21_VAE, (1280, 720, 81)), (WAN22_VAE, (1280, 704, 121))):
        results.append(capped_tiled_decode(config, width, height, frames, vram_gib, torch.device("cuda")))
        print(json.dumps(results[-1]), flush=True)
        torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--full", action="store_true", help="Full-size VAEs at 720P on CUDA.")
    parser.add_argument("--vram", type=float, default=24.0, help="VRAM cap in GiB for --full.")
    args = parser.parse_args()
    if args.full and not torch.cuda.is_available():
        raise SystemExit("--full needs a CUDA device")
    results = gpu_scenarios(args.vram) if args.full else cpu_scenarios()
    device = torch.cuda.get_device_name() if args.full else platform.processor() or "cpu"
    report = {"benchmark": "vae_tiling_bench", "device": device, "torch": torch.__version__,
              "note": "random weights; seconds are wall clock", "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
