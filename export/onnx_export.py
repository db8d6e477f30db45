"""ONNX export of the export components (export/specs.py): the input of TensorRT's parser.

Exporter: torch.onnx's TorchScript-based exporter (`dynamo=False`), the one NVIDIA's TensorRT
diffusion demo uses, whose graphs that parser is tested on. It takes the spec's
`dynamic_axes` as they are; the dynamo exporter would need onnxscript, which wanrt does not
depend on. torch has deprecated this exporter since 2.9: when it goes, the dynamo exporter
(with onnxscript functions for the re-expressions below) replaces it.

What the tracer or the opset cannot take as the models are written is re-expressed here,
for the duration of an export only (the model code is untouched):

* Quantized Linears (export/quantize.py) become explicit Q/DQ: see `QDQLinear`.
* A bf16 convolution computes in float32 (`Float32Conv`): Conv has no bf16 before opset 22.
* `Tensor.unflatten`: torch's symbolic computes the split position in the graph, ONNX shape
  inference then loses the shape, and the exporter falls back to the traced sizes for every
  later `x.shape`, baking the export resolution into the VAE (`framewise`). Here the
  position is a constant and shapes stay symbolic.
* Nearest-exact upsampling (VAE decoder) has no torch symbolic. ONNX `Resize` with
  half-pixel coordinates rounded half up reads the same source pixel, floor((dst + 0.5) /
  scale); TensorRT's parser takes both modes.

Opset 20: float8 Q/DQ types came in 19, and 20 has GELU (tanh) as one op; before it the
tracer spells GELU out with its constants in the graph's dtype, rounded to bf16 in a bf16
graph (sqrt(2/pi) becomes 0.797). TensorRT's parser reads opsets 9-20 since 10.0 (up to 25
in TensorRT 11) and imports Gelu as its kGELU_TANH activation.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wanrt.errors import ConfigError, WanrtError
from wanrt.export.quantize import QuantizedLinear, compute_dtype
from wanrt.export.specs import ExportSpec, export_module

ONNX_OPSET = 20
# protobuf cannot serialize a ModelProto of 2 GiB or more: bigger graphs keep their
# tensors in one external data file beside the .onnx (`<name>.data`).
PROTOBUF_LIMIT = 2**31 - 1


class OnnxExportError(WanrtError):
    """An exported graph does not match its spec (a bug to report, not a user error)."""


def require_onnx():
    try:
        import onnx
    except ImportError:
        raise ConfigError("ONNX export needs onnx: pip install 'wanrt[onnx]'") from None
    return onnx


# ---------------------------------------------------------------------------- Q/DQ


class _DequantizeUnitScale(torch.autograd.Function):
    """The stored 8-bit weight as numbers of the compute dtype (exact: every int8 and e4m3
    value is a bf16 value). In the graph: DequantizeLinear with a scalar scale of 1 and an
    explicit zero point of the weight's type."""

    @staticmethod
    def forward(ctx, values: Tensor, dtype: torch.dtype) -> Tensor:
        return values.to(dtype)

    @staticmethod
    def symbolic(g, values, dtype: torch.dtype):
        scale = g.op("Constant", value_t=torch.tensor(1.0, dtype=dtype))
        # onnxruntime's CPU optimizer mis-reads an int8 DequantizeLinear without a zero point
        # (it assumes uint8); TensorRT's parser also takes the Q/DQ type from the zero point.
        zero_point = g.op("Constant", value_t=torch.zeros((), dtype=values.type().dtype()))
        return g.op("DequantizeLinear", values, scale, zero_point)


class QDQLinear(nn.Module):
    """A `QuantizedLinear` as the ONNX graph computes it: y = (x @ DQ(q)^T) * s + b.

    TensorRT dequantizes per channel only a tensor rooted at a constant ("Per-channel
    dequantization is supported only for input that is rooted at an IConstantLayer",
    IDequantizeLayer, NvInfer.h of TensorRT 10 and 11). DIT_BLOCK takes its weights as
    engine inputs, so the per-output-channel scale cannot sit in the DequantizeLinear: the
    weight is dequantized with a per-tensor scale of 1 and the scale multiplies the GEMM's
    output channels, which is the same product. Activations stay in the compute dtype: our
    W8A8 kernels quantize them per token at run time, which Q/DQ cannot express (activation
    scales are per tensor), so the engine is weight-only 8-bit: 8-bit weights stored and
    streamed, GEMMs in bf16.

    The tensors keep their names and order (bias, weight, weight_scale), so the block's
    weight inputs are those of the quantized block.
    """

    def __init__(self, linear: QuantizedLinear) -> None:
        super().__init__()
        self.bias = linear.bias
        self.register_buffer("weight", linear.weight)
        self.register_buffer("weight_scale", linear.weight_scale)

    def forward(self, x: Tensor) -> Tensor:
        dtype = compute_dtype(x)
        out = F.linear(x.to(dtype), _DequantizeUnitScale.apply(self.weight, dtype))
        # The channel scale and bias in float32, as the eager kernels apply them.
        out = out.float() * self.weight_scale
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(dtype)


# ---------------------------------------------------------------------------- symbolics


def _unflatten_symbolic(g, input, dim, sizes):
    """Reshape to shape[:dim] + sizes + shape[dim + 1:], the slice bounds constants."""
    from torch.onnx import symbolic_helper

    dim = symbolic_helper._get_const(dim, "i", "dim") % symbolic_helper._get_tensor_rank(input)
    shape = g.op("Shape", input)

    def axes(start: int, end: int):
        bounds = (torch.tensor([start]), torch.tensor([end]))
        return g.op("Slice", shape, *(g.op("Constant", value_t=bound) for bound in bounds))

    return g.op("Reshape", input, g.op("Concat", axes(0, dim), sizes, axes(dim + 1, 2**62), axis_i=0))


def _upsample_nearest_exact2d_symbolic(g, input, output_size, scale_factors):
    """nn.Upsample(scale_factor=k, mode="nearest-exact") as ONNX Resize (see the module doc)."""
    from torch.onnx import symbolic_helper

    scales = symbolic_helper._maybe_get_const(scale_factors, "fs")
    if symbolic_helper._is_value(scales) or scales is None:
        return symbolic_helper._unimplemented("_upsample_nearest_exact2d", "needs constant scale factors")
    empty_roi = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
    all_scales = g.op("Constant", value_t=torch.tensor([1.0, 1.0, *scales], dtype=torch.float32))
    return g.op("Resize", input, empty_roi, all_scales, mode_s="nearest",
                coordinate_transformation_mode_s="half_pixel", nearest_mode_s="round_prefer_ceil")


_SYMBOLICS = {"aten::unflatten": _unflatten_symbolic,
              "aten::_upsample_nearest_exact2d": _upsample_nearest_exact2d_symbolic}


class Float32Conv(nn.Module):
    """A bf16 convolution computed in float32 and rounded once to the compute dtype: ONNX's
    Conv has no bfloat16 type before opset 22. Only the DiT's patch embedding is one."""

    def __init__(self, conv: nn.Conv2d | nn.Conv3d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        dtype = compute_dtype(x)
        bias = self.conv.bias.float() if self.conv.bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            return self.conv._conv_forward(x.float(), self.conv.weight.float(), bias).to(dtype)


def _export_substitute(module: nn.Module) -> nn.Module | None:
    if isinstance(module, QuantizedLinear):
        return QDQLinear(module)
    if type(module) in (nn.Conv2d, nn.Conv3d) and module.weight.dtype == torch.bfloat16:
        return Float32Conv(module)
    return None


@contextlib.contextmanager
def _export_view(model: nn.Module, opset: int) -> Iterator[None]:
    """The substitutes above and the symbolics of this module, until the export ends."""
    swapped = [(name, module, substitute) for name, module in model.named_modules()
               if (substitute := _export_substitute(module)) is not None]
    for name, _, substitute in swapped:
        model.set_submodule(name, substitute)
    for op, symbolic in _SYMBOLICS.items():
        torch.onnx.register_custom_op_symbolic(op, symbolic, opset)
    try:
        yield
    finally:
        for op in _SYMBOLICS:
            torch.onnx.unregister_custom_op_symbolic(op, opset)
        for name, module, _ in swapped:
            model.set_submodule(name, module)


# ---------------------------------------------------------------------------- export

_ONNX_TYPES = {torch.float32: "FLOAT", torch.float16: "FLOAT16", torch.bfloat16: "BFLOAT16",
               torch.float64: "DOUBLE", torch.int64: "INT64", torch.int32: "INT32", torch.int8: "INT8",
               torch.uint8: "UINT8", torch.bool: "BOOL", torch.float8_e4m3fn: "FLOAT8E4M3FN"}


def onnx_type(dtype: torch.dtype) -> int:
    """The ONNX TensorProto element type of a torch dtype."""
    return getattr(require_onnx().TensorProto, _ONNX_TYPES[dtype])


def _dims_match(dims: tuple[int | str, ...], spec_shape: tuple[int | str, ...], exact: bool) -> bool:
    """Input dims must be the spec's; an output dim the exporter could not infer (a
    generated name where the spec has a number) is accepted."""
    if len(dims) != len(spec_shape):
        return False
    return all(dim == want or (not exact and isinstance(want, int) and isinstance(dim, str))
               for dim, want in zip(dims, spec_shape))


def check_signature(graph, spec: ExportSpec, source: str) -> None:
    """The graph's inputs and outputs must be the spec's: names, order, types and axes.

    The tracer silently drops an input the graph never reads; a runner binding by name
    would then fail far from the cause.
    """
    for kind, values, tensors in (("inputs", graph.input, spec.inputs), ("outputs", graph.output, spec.outputs)):
        names = [v.name for v in values]
        if names != [t.name for t in tensors]:
            missing = sorted({t.name for t in tensors} - set(names))
            raise OnnxExportError(f"{source}: graph {kind} {names[:8]}... differ from the spec "
                                  f"({len(tensors)} {kind}; missing {missing[:8]})")
        for value, tensor in zip(values, tensors):
            tensor_type = value.type.tensor_type
            dims = tuple(d.dim_param or d.dim_value for d in tensor_type.shape.dim)
            if (tensor_type.elem_type != onnx_type(tensor.dtype)
                    or not _dims_match(dims, tensor.shape, exact=kind == "inputs")):
                raise OnnxExportError(f"{source}: {kind[:-1]} {value.name} is type {tensor_type.elem_type} "
                                      f"{dims}, the spec says {tensor.dtype} {tensor.shape}")


def _initializer_bytes(proto) -> int:
    return sum(len(t.raw_data) for t in proto.graph.initializer)


def export_onnx(spec: ExportSpec, model: nn.Module, path: Path, *, opset: int = ONNX_OPSET,
                external_data_threshold: int = PROTOBUF_LIMIT) -> Path:
    """Export `model` (what `export_module` takes for `spec.component`) to `path`.

    The graph takes the spec's inputs under its names with its dynamic axes (traced at the
    profile's opt shapes), passes `onnx.checker` (full check) and is moved into place only
    then; initializers over `external_data_threshold` bytes go to `<name>.data` beside it.
    """
    onnx = require_onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = f"{path.name}.data"
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as staging:
        traced = Path(staging) / "traced.onnx"
        with torch.no_grad(), _export_view(model, opset), warnings.catch_warnings():
            # The tracer warns at every Python branch on a shape (constant for a fixed
            # model, and the exported graphs are tested at two shapes) and that the
            # TorchScript exporter is the legacy one; neither is news to the user.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*(legacy TorchScript-based ONNX|Constant folding)")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.onnx")
            device = next(model.parameters()).device  # traced where the model is (a GPU for TensorRT)
            torch.onnx.export(export_module(spec.component, model), spec.example_inputs(device=device), str(traced),
                              dynamo=False, opset_version=opset, input_names=spec.input_names(),
                              output_names=spec.output_names(), dynamic_axes=spec.dynamic_axes())
        # Past 2 GiB the tracer writes one file per tensor beside the graph; load gathers them.
        proto = onnx.load(str(traced))
        check_signature(proto.graph, spec, str(path))
        external = _initializer_bytes(proto) > external_data_threshold
        staged = Path(staging) / path.name
        onnx.save_model(proto, str(staged), save_as_external_data=external, all_tensors_to_one_file=True,
                        location=data_name)
        onnx.checker.check_model(str(staged), full_check=True)
        # The data first: the graph is what marks the export complete.
        if external:
            _move_into_place(Path(staging) / data_name, path.parent / data_name)
        else:
            (path.parent / data_name).unlink(missing_ok=True)
        _move_into_place(staged, path)
    return path


def _move_into_place(staged: Path, final: Path) -> None:
    """Give the file the permissions a plain open() would (onnx may create it 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staged, 0o666 & ~umask)
    os.replace(staged, final)


# ---------------------------------------------------------------------------- onnxruntime


def _ort_value(tensor: Tensor):
    import onnxruntime

    array = tensor.detach().cpu().contiguous()
    if array.dtype in (torch.float8_e4m3fn, torch.bfloat16):
        # numpy has neither type: hand over the bits with the ONNX type named.
        bits = array.view(torch.uint8 if array.dtype.itemsize == 1 else torch.int16).numpy()
        return onnxruntime.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, onnx_type(array.dtype))
    return onnxruntime.OrtValue.ortvalue_from_numpy(array.numpy())


def run_onnxruntime(path: Path, spec: ExportSpec, inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Run an exported graph in onnxruntime on the CPU: the spec's outputs, as tensors."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError("running ONNX graphs needs onnxruntime: pip install 'wanrt[onnx]'") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {tensor.name: _ort_value(x) for tensor, x in zip(spec.inputs, inputs, strict=True)}
    outputs = session.run_with_ort_values(spec.output_names(), feeds)
    return tuple(torch.from_numpy(value.numpy()) for value in outputs)
