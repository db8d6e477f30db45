"""Time and peak memory of the full-size non-DiT components: umt5-xxl and both VAEs.

These set the memory planner's numbers (issue: fit A14B in 24 GB): how much the VAE decode
of a whole video needs at once, and what T5 costs on the GPU. Random weights.

    python benchmarks/components_bench.py --out benchmarks/results/components_<device>.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from wanrt.configs import UMT5_XXL, WAN21_VAE, WAN22_VAE
from wanrt.models.t5 import UMT5Encoder
from wanrt.models.vae import WanVAE
from wanrt.random_weights import randomize_


def measure(label: str, fn, *args, repeats: int = 2) -> dict:
    """Peak memory above what was allocated before, and the fastest of `repeats` runs."""
    fn(*args)  # warm-up (cuDNN algorithm choice, allocator)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(*args)
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1000)
    result = {"scenario": label, "seconds_min": min(seconds), "runs": repeats,
              "peak_extra_bytes": torch.cuda.max_memory_allocated() - base,
              "output_shape": list(out.shape), "output_finite": bool(torch.isfinite(out).all())}
    print(json.dumps(result), flush=True)
    return result


def build(model_cls, config, dtype: torch.dtype):
    with torch.device("meta"):
        model = model_cls(config)
    return randomize_(model, seed=0, device="cuda").to(dtype).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("components_bench needs a CUDA device")
    results = []
    with torch.no_grad():
        t5 = build(UMT5Encoder, UMT5_XXL, torch.bfloat16)
        weights = sum(p.numel() * p.element_size() for p in t5.parameters())
        ids = torch.randint(3, UMT5_XXL.vocab_size, (2, UMT5_XXL.text_len), device="cuda")
        mask = torch.ones_like(ids)
        results.append({**measure("umt5-xxl bf16, 2 prompts x 512 tokens", t5, ids, mask),
                        "weight_bytes": weights})
        del t5
        torch.cuda.empty_cache()

        for label, config, latent_shape, pixels in (
                ("Wan2.1 VAE fp32 480P 81 frames", WAN21_VAE, (1, 16, 21, 60, 104), (1, 3, 81, 480, 832)),
                ("Wan2.2 VAE fp32 720P 121 frames", WAN22_VAE, (1, 48, 31, 44, 80), (1, 3, 121, 704, 1280))):
            vae = build(WanVAE, config, torch.float32)
            weights = sum(p.numel() * p.element_size() for p in vae.parameters())
            latents = torch.randn(latent_shape, device="cuda")
            results.append({**measure(f"{label} decode", vae.decode, latents, repeats=1),
                            "weight_bytes": weights})
            video = torch.rand(pixels, device="cuda") * 2 - 1
            results.append({**measure(f"{label} encode", vae.encode, video, repeats=1),
                            "weight_bytes": weights})
            del vae, latents, video
            torch.cuda.empty_cache()

    report = {"benchmark": "components_bench", "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "note": "random weights; whole video in one call "
              "(the official chunk-by-chunk causal loop, no tiling)", "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
