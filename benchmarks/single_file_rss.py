"""Peak host RSS while loading a single-file DiT expert, against the file's size.

Writes a random-weight Wan2.2 A14B-shaped DiT (full widths, `--layers` blocks; 3 blocks is
2.2 GB in bf16) as a ComfyUI-style single file, bf16 and scaled fp8, then loads each in a fresh
process through `wanrt.loading.checkpoint.load_dit` and reports the growth of the peak RSS
(VmHWM - VmRSS before loading) over the file size. For comparison, the same file read the way
wanrt did before (safetensors' memory map, then a copy of each tensor). Linux only (/proc).

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
before = status("VmRSS:")
if mode == "wanrt":
    model = load_dit(path, expect=expect, dtype=torch.bfloat16)
else:  # memory map, then one copy per tensor, kept (what a loader that assigns copies does)
    with safe_open(str(path), framework="pt") as handle:
        kept = {key: handle.get_tensor(key).clone() for key in handle.keys()}
print(json.dumps({"before": before, "peak": status("VmHWM:")}))
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
    size = path.stat().st_size
    return {"mode": mode, "file": path.name, "file_gb": size / 1e9,
            "peak_growth_gb": (figures["peak"] - figures["before"]) / 1e9,
            "ratio": (figures["peak"] - figures["before"]) / size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the files (default: a temp dir)")
    parser.add_argument("--layers", type=int, default=3, help="A14B blocks in the file (3: 2.2 GB bf16)")
    args = parser.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="wanrt-rss-"))
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, fp8 in (("bf16", False), ("fp8_scaled", True)):
        path = folder / f"wan2.2_t2v_{args.layers}blocks_{name}.safetensors"
        write_streamed(path, dit_shapes(args.layers, fp8), random_fill)
        modes = ("wanrt", "mmap+copy") if not fp8 else ("wanrt",)
        rows += [measure(mode, path, args.layers) for mode in modes]
        path.unlink()
    for row in rows:
        print(f"{row['file']:45s} {row['mode']:10s} file {row['file_gb']:.2f} GB  "
              f"peak RSS growth {row['peak_growth_gb']:.2f} GB = {row['ratio']:.3f}x")


if __name__ == "__main__":
    main()
