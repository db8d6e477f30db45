"""AOTInductor: `torch.export` of a component's export module, compiled ahead of time into a
`.pt2` package (C++ on the CPU, Triton/CUDA on a GPU) that `aoti_load_package` runs without
tracing or compiling again.

Dynamic shapes: every named axis of the spec becomes a `torch.export.Dim` whose range is the
profile's min..max, and a scaled axis (`latent_rows_x16`) a derived dim (16 * latent_rows),
so one package serves the whole profile. Every component exports with dynamic shapes on
torch 2.13 (SDPA over a dynamic token count included). An axis whose min equals its max is
exported static; a profile of one run is then a fully static package (`dynamic: false` in the
manifest), which is what the runtime's on-demand cache builds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torch.export import Dim

from wanrt.export.manifest import BuiltFiles
from wanrt.export.quantize import QuantizedLinear
from wanrt.export.specs import ExportSpec, ShapeProfile, export_module, parse_axis

PACKAGE_FILE = "model.pt2"


class _Positional(nn.Module):
    """`forward(*inputs)`: one tuple of dynamic shapes covers every input, weights included."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.module(*inputs))


def axis_ranges(spec: ExportSpec, profile: ShapeProfile) -> dict[str, tuple[int, int]]:
    """(min, max) of every base axis over the profile, in units of the base."""
    ranges: dict[str, tuple[int, int]] = {}
    for tensor in spec.inputs:
        low, _, high = profile.shapes[tensor.name]
        for index, dim in enumerate(tensor.shape):
            if isinstance(dim, str):
                base, factor = parse_axis(dim)
                lo, hi = low[index] // factor, high[index] // factor
                known = ranges.get(base, (lo, hi))
                ranges[base] = (min(known[0], lo), max(known[1], hi))
    return ranges


def dynamic_shapes(spec: ExportSpec, profile: ShapeProfile) -> tuple[tuple[dict | None, ...]]:
    dims = {base: Dim(base, min=lo, max=hi) for base, (lo, hi) in axis_ranges(spec, profile).items() if lo < hi}
    per_input = []
    for tensor in spec.inputs:
        axes = {}
        for index, dim in enumerate(tensor.shape):
            if isinstance(dim, str) and parse_axis(dim)[0] in dims:
                base, factor = parse_axis(dim)
                axes[index] = dims[base] if factor == 1 else factor * dims[base]
        per_input.append(axes or None)
    return (tuple(per_input),)


def build_package(spec: ExportSpec, model: nn.Module, out_dir: Path, device: torch.device) -> BuiltFiles:
    """Export `model` (what `export_module` takes) over `spec.profiles[0]` and compile it
    into `out_dir/model.pt2` for `device`."""
    profile = spec.profiles[0]
    shapes = dynamic_shapes(spec, profile)
    # Quantized Linears probe the device for their W8A8 kernel on first use; the probe must
    # run on real tensors now, not on the fake ones torch.export traces with.
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.kernel_for(device)
    example = spec.example_inputs(profile, "opt", device=device)
    with torch.no_grad():
        program = torch.export.export(_Positional(export_module(spec.component, model)), example,
                                         dynamic_shapes=shapes)
        torch._inductor.aoti_compile_and_package(program, package_path=str(Path(out_dir) / PACKAGE_FILE))
    dynamic = any(axes for axes in shapes[0])
    return BuiltFiles((PACKAGE_FILE,), dynamic,
                      "torch.export dynamic dims over the profile" if dynamic else "static shapes")


def load_package(directory: Path, device: torch.device):
    """Deserialize a verified package (call `manifest.verify` first): a callable taking the
    spec's inputs positionally and returning the list of outputs."""
    index = device.index if device.type == "cuda" and device.index is not None else -1
    return torch._inductor.aoti_load_package(str(Path(directory) / PACKAGE_FILE), device_index=index)
