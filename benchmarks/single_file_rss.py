"""Peak host RSS while loading a single-file DiT expert, against the file's size.

Writes a random-weight Wan2.2 A14B-shaped DiT (full widths, `--layers` blocks; 3 blocks is
2.6 GB in bf16) as a ComfyUI-style single file, bf16 and scaled fp8, then in a fresh process
each: reads its tensors (`iter_safetensors`), loads it as a model (`load_dit`, bf16), and, for
comparison, reads it the way wanrt did before (safetensors' memory map, then a copy of each
tensor). Reported: the peak RSS growth (VmHWM - VmRSS before loading) over the file size and
over the bytes held at the end (the model is larger than a bf16 file by the modules it keeps
in float32: +0.37 GB for an A14B expert, 1.3% of its 28.6 GB, 14% of 3 blocks). Linux only.

    python benchmarks/single_file_rss.py --dir /tmp/rss --layers 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from wanrt.configs import get_task
from wanrt.loading.files import SAFETENSORS_DTYPES
from wanrt.models.dit import WanDiT

_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

_PROBE = """
import sys, json, dataclasses, torch
from pathlib import Path

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

mode, path, layers = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
from wanrt.configs import get_task
from wanrt.loading.checkpoint import load_dit
from safetensors import safe_open
expect = dataclasses.replace(get_task("t2v-A14B").dit, num_layers=layers)
from wanrt.loading.files import iter_safetensors
import wanrt.loading.gguf_file  # imported on first use: not part of what loading holds
before = status("VmRSS:")
if mode == "load_dit":
    kept = load_dit(path, expect=expect, dtype=torch.bfloat16).state_dict()
elif mode == "read":  # the file's tensors into their own buffers, nothing else
    kept = dict(iter_safetensors(path))
else:  # memory map, then one copy per tensor, kept (what a loader that assigns copies does)
    with safe_open(str(path), framework="pt") as handle:
        kept = {key: handle.get_tensor(key).clone() for key in handle.keys()}
held = sum(t.numel() * t.element_size() for t in kept.values())
print(json.dumps({"before": before, "peak": status("VmHWM:"), "held": held}))
"""


def write_streamed(path: Path, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], fill) -> None:
    """A safetensors file written tensor by tensor (never the whole state in memory)."""
    header, offset = {}, 0
    for key, (shape, dtype) in shapes.items():
        nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        header[key] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(encoded)) + encoded)
        for key, (shape, dtype) in shapes.items():
            fh.write(fill(key, shape, dtype).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def dit_shapes(layers: int, fp8: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    config = dataclasses.replace(get_task("t2v-A14B").dit, num_layers=layers)
    with torch.device("meta"):
        model = WanDiT(config)
    shapes = {}
    for key, tensor in model.state_dict().items():
        is_block_linear = key.startswith("blocks.") and tensor.dim() == 2 and "norm" not in key
        shapes[key] = (tuple(tensor.shape), torch.float8_e4m3fn if fp8 and is_block_linear else torch.bfloat16)
        if fp8 and is_block_linear:
            shapes[key.removesuffix(".weight") + ".scale_weight"] = ((), torch.float32)
    return shapes


def random_fill(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if key.endswith(".scale_weight"):
        return torch.tensor(0.02 / 448)
    values = torch.randn(shape, dtype=torch.bfloat16) * 0.02
    return (values.float() / (0.02 / 448)).clamp(-448, 448).to(dtype) if dtype == torch.float8_e4m3fn else values


def measure(mode: str, path: Path, layers: int) -> dict:
    result = subprocess.run([sys.executable, "-c", _PROBE, mode, str(path), str(layers)],
                            capture_output=True, text=True, check=True)
    figures = json.loads(result.stdout)
    size, growth = path.stat().st_size, figures["peak"] - figures["before"]
    return {"mode": mode, "file": path.name, "file_gb": size / 1e9, "held_gb": figures["held"] / 1e9,
            "peak_growth_gb": growth / 1e9, "vs_file": growth / size, "vs_held": growth / figures["held"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the files (default: a temp dir)")
    parser.add_argument("--layers", type=int, default=3, help="A14B blocks in the file (3: 2.6 GB bf16)")
    args = parser.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="wanrt-rss-"))
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, fp8 in (("bf16", False), ("fp8_scaled", True)):
        path = folder / f"wan2.2_t2v_{args.layers}blocks_{name}.safetensors"
        write_streamed(path, dit_shapes(args.layers, fp8), random_fill)
        modes = ("read", "load_dit", "mmap+copy") if not fp8 else ("read", "load_dit")
        rows += [measure(mode, path, args.layers) for mode in modes]
        path.unlink()
    for row in rows:
        print(f"{row['file']:45s} {row['mode']:9s} file {row['file_gb']:.2f} GB, holds {row['held_gb']:.2f} GB: "
              f"peak RSS growth {row['peak_growth_gb']:.2f} GB = {row['vs_file']:.3f}x the file, "
              f"{row['vs_held']:.3f}x what it holds")


if __name__ == "__main__":
    main()
