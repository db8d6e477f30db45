"""TensorRT engines from the exported ONNX graphs, built through TensorRT's Python API.

TensorRT is an optional extra, imported only when a build or a run asks for it. Written
against TensorRT 10.x/11.x (`trt.Builder`, `OnnxParser.parse_from_file`, builder-config
timing cache and optimization profiles, `build_serialized_network`); it has not been run in
wanrt's CI, which has no TensorRT.

Precision lives in the graph. The network is strongly typed (the `STRONGLY_TYPED` flag of
TensorRT 10; TensorRT 11 is always strongly typed and ignores the flag, and has no
FP16/INT8/FP8 builder flags any more): a bf16 graph gets bf16 kernels, and the 8-bit
weights of a quantized model arrive as explicit DequantizeLinear nodes (export/onnx_export.py
`QDQLinear`). Standard ONNX Q/DQ with an int8 or float8e4m3fn zero point is what TensorRT's
parser maps to its Q/DQ layers (onnx-tensorrt `QuantDequantLinearHelper`: the zero point's
type picks INT8 or FP8; the custom `TRT_FP8QuantizeLinear` ops are only an older spelling).

One optimization profile per ShapeProfile of the spec, each setting (min, opt, max) of every
input with a dynamic axis. The timing cache file is read before and written after the build,
so rebuilding for another shape range re-times only what is new.
"""

from __future__ import annotations

from pathlib import Path

from wanrt.errors import WanrtError
from wanrt.export.onnx_export import check_signature, require_onnx
from wanrt.export.quantize import Scheme, parse_scheme
from wanrt.export.specs import ExportSpec
from wanrt.loading.save import write_atomic

TENSORRT_MISSING = ("TensorRT is not installed: pip install 'wanrt[tensorrt]' on a machine with "
                    "NVIDIA's TensorRT 10.x wheels (or pick another --engine/--backend: aoti, compile, eager)")
MIN_TENSORRT_MAJOR = 10

Shapes = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


class TensorRTUnavailableError(WanrtError):
    """TensorRT cannot be imported (or is too old) on this machine."""


class TensorRTBuildError(WanrtError):
    """TensorRT refused a graph or a build; the message carries its errors."""


def import_tensorrt():
    """The `tensorrt` module, or a TensorRTUnavailableError saying how to install it."""
    try:
        import tensorrt
    except ImportError:
        raise TensorRTUnavailableError(TENSORRT_MISSING) from None
    major = int(tensorrt.__version__.split(".")[0])
    if major < MIN_TENSORRT_MAJOR:
        raise TensorRTUnavailableError(f"TensorRT {tensorrt.__version__} is too old: wanrt's engines need "
                                       f"{MIN_TENSORRT_MAJOR}.x or newer (strongly typed networks, FP8 Q/DQ)")
    return tensorrt


# ---------------------------------------------------------------------------- graph checks

_QDQ_SCHEMES = {"INT8": Scheme.INT8, "FLOAT8E4M3FN": Scheme.FP8}


def graph_weight_scheme(proto) -> Scheme:
    """FP8 or INT8 when the graph dequantizes weights of that type, else BF16 (the
    unquantized scheme: the graph computes in the dtype it was exported in)."""
    onnx = require_onnx()
    types = {v.name: v.type.tensor_type.elem_type for v in proto.graph.input}
    types.update({t.name: t.data_type for t in proto.graph.initializer})
    dequantized = {onnx.TensorProto.DataType.Name(types[n.input[0]]) for n in proto.graph.node
                   if n.op_type == "DequantizeLinear" and n.input[0] in types}
    schemes = {_QDQ_SCHEMES[name] for name in dequantized if name in _QDQ_SCHEMES}
    if len(schemes) > 1:
        raise TensorRTBuildError(f"the graph mixes {sorted(s.value for s in schemes)} weights")
    return schemes.pop() if schemes else Scheme.BF16


def check_precision(proto, precision: Scheme | str, source: str) -> None:
    """8-bit weights in the graph must be of the asked scheme: a strongly typed build has no
    flag that could change them. A graph without any (the VAE, the DiT's pre and post, a
    block the precision policy kept) builds under every scheme."""
    wanted = parse_scheme(precision)
    found = graph_weight_scheme(proto)
    if found is not Scheme.BF16 and found is not wanted:
        raise TensorRTBuildError(f"{source} holds {found.value} weights but {wanted.value} was asked for: "
                                 f"export it from the {wanted.value} model")


# TensorRT 10's ONNX parser, as its operator table documents it (onnx-tensorrt
# docs/operators.md): the operators it supports, the inputs it needs constant, and the
# Resize attributes it implements. Checked on the CPU because no CI machine has TensorRT.
TENSORRT_MAX_OPSET = 20
TENSORRT_OPS = frozenset("""
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike
    Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv
    DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor GRU
    Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater
    GreaterOrEqual GridSample GroupNormalization HardSigmoid HardSwish Hardmax Identity If ImageScaler
    InstanceNormalization IsInf IsNaN LRN LSTM LayerNormalization LeakyRelu Less LessOrEqual Log
    LogSoftmax Loop LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod
    Mul Neg NonMaxSuppression NonZero Not OneHot Or PRelu Pad ParametricSoftplus Pow QuantizeLinear RNN
    RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2
    ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu
    Reshape Resize ReverseSequence RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu
    Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze
    Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
# Operator -> index of its `axes` input, which must be an initializer or a Constant.
_CONSTANT_AXES = {"Pad": 3, "Slice": 3, "Squeeze": 1, "Unsqueeze": 1,
                  **{op: 1 for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
                                      "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")}}
_RESIZE_SUPPORTED = {
    "mode": {"nearest", "linear"},
    "coordinate_transformation_mode": {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn",
                                       "asymmetric", "align_corners"},
    "nearest_mode": {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"},
}
# ONNX defaults of those attributes (what an absent attribute means).
_RESIZE_DEFAULTS = {"mode": "nearest", "coordinate_transformation_mode": "half_pixel",
                    "nearest_mode": "round_prefer_floor"}


def float64_tensors(proto) -> list[str]:
    """Names of the graph's float64 tensors, casts and constants. TensorRT has no float64:
    its parser casts DOUBLE down to FLOAT without failing, which would silently move float64
    math (the timestep sinusoid's phases) to float32."""
    onnx = require_onnx()
    double = onnx.TensorProto.DOUBLE
    try:
        graph = onnx.shape_inference.infer_shapes(proto).graph
    except onnx.shape_inference.InferenceError:  # an operator ONNX does not know: no inner types
        graph = proto.graph
    found = [v.name for v in (*graph.input, *graph.output, *graph.value_info)
             if v.type.tensor_type.elem_type == double]
    found += [t.name for t in graph.initializer if t.data_type == double]
    for node in graph.node:
        attributes = {a.name: a for a in node.attribute}
        if node.op_type == "Cast" and attributes["to"].i == double:
            found.append(node.name)
        if node.op_type == "Constant" and "value" in attributes and attributes["value"].t.data_type == double:
            found.append(node.name)
    return found


def unsupported_by_tensorrt(proto) -> list[str]:
    """What of the graph TensorRT 10's ONNX parser refuses, one phrase per problem: the
    opset, operators outside its table or the default domain, `axes` inputs that are not
    constant, Resize attributes it does not implement, float64 (see `float64_tensors`)."""
    onnx = require_onnx()
    problems = []
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset > TENSORRT_MAX_OPSET:
        problems.append(f"opset {opset} (TensorRT 10 parses opsets 9-{TENSORRT_MAX_OPSET})")
    graph = proto.graph
    constants = {t.name for t in graph.initializer}
    constants.update(out for node in graph.node if node.op_type == "Constant" for out in node.output)
    for node in graph.node:
        where = f"{node.op_type} {node.name}"
        if node.domain not in ("", "ai.onnx") or node.op_type not in TENSORRT_OPS:
            problems.append(f"{where}: operator not supported")
            continue
        axes = _CONSTANT_AXES.get(node.op_type)
        if axes is not None and len(node.input) > axes and node.input[axes] and node.input[axes] not in constants:
            problems.append(f"{where}: its axes are computed, TensorRT needs them constant")
        if node.op_type == "Resize":
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            for name, supported in _RESIZE_SUPPORTED.items():
                value = attributes.get(name, _RESIZE_DEFAULTS[name])
                value = value.decode() if isinstance(value, bytes) else value
                if value not in supported:
                    problems.append(f"{where}: {name} {value!r} is not implemented")
            if attributes.get("antialias", 0):
                problems.append(f"{where}: antialiasing is not implemented")
    problems += [f"{name}: float64 (TensorRT would cast it to float32; compute it outside the graph)"
                 for name in float64_tensors(proto)]
    return problems


def check_tensorrt_graph(proto, source: str) -> None:
    problems = unsupported_by_tensorrt(proto)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise TensorRTBuildError(f"{source} cannot be built by TensorRT: {'; '.join(problems[:3])}{more}")


def optimization_profiles(spec: ExportSpec, graph) -> list[dict[str, Shapes]]:
    """For each ShapeProfile, (min, opt, max) of every graph input with a dynamic axis:
    exactly what `IOptimizationProfile.set_shape` receives. Static axes must agree with
    the graph, and min <= opt <= max on every axis; inputs without dynamic axes need no
    entry (TensorRT takes their shape from the network)."""
    dims = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in graph.input}
    profiles = []
    for profile in spec.profiles:
        shapes: dict[str, Shapes] = {}
        for name, graph_dims in dims.items():
            if name not in profile.shapes:
                raise TensorRTBuildError(f"profile {profile.name!r} has no shapes for input {name}")
            low, opt, high = (tuple(s) for s in profile.shapes[name])
            if not len(low) == len(opt) == len(high) == len(graph_dims):
                raise TensorRTBuildError(f"profile {profile.name!r}: {name} shapes {low}/{opt}/{high} "
                                         f"do not have the graph's rank {len(graph_dims)}")
            for axis, static in enumerate(graph_dims):
                if static is not None and not low[axis] == opt[axis] == high[axis] == static:
                    raise TensorRTBuildError(f"profile {profile.name!r}: {name} axis {axis} is {static} in "
                                             f"the graph, the profile asks {low[axis]}/{opt[axis]}/{high[axis]}")
                if not low[axis] <= opt[axis] <= high[axis]:
                    raise TensorRTBuildError(f"profile {profile.name!r}: {name} axis {axis} needs "
                                             f"min <= opt <= max, got {low[axis]}/{opt[axis]}/{high[axis]}")
            if None in graph_dims:
                shapes[name] = (low, opt, high)
        profiles.append(shapes)
    return profiles


# ---------------------------------------------------------------------------- build


def _parse_errors(parser) -> str:
    return "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "no details"


def build_tensorrt_engine(onnx_path: Path, spec: ExportSpec, out_path: Path, precision: Scheme | str,
                          timing_cache: Path | None = None, workspace_bytes: int | None = None) -> Path:
    """Parse `onnx_path` (written by `export_onnx` for `spec`), build a serialized engine
    with one optimization profile per spec profile, and write it atomically to `out_path`.

    The graph is checked first, on the CPU and without TensorRT: its inputs and outputs
    are the spec's, TensorRT's parser supports everything in it (`unsupported_by_tensorrt`),
    its 8-bit weights (if any) are of the `precision` scheme, and every profile fits it.
    """
    onnx = require_onnx()
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    proto = onnx.load(str(onnx_path), load_external_data=False)
    check_signature(proto.graph, spec, str(onnx_path))
    check_tensorrt_graph(proto, str(onnx_path))
    check_precision(proto, precision, str(onnx_path))
    profiles = optimization_profiles(spec, proto.graph)

    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    # From the file, so that external data beside it is found.
    if not parser.parse_from_file(str(onnx_path)):
        raise TensorRTBuildError(f"{onnx_path}: TensorRT's ONNX parser refused the graph: {_parse_errors(parser)}")

    config = builder.create_builder_config()
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    # A cache from another GPU or TensorRT version (or a damaged file) is refused: start afresh.
    if cache is None or not config.set_timing_cache(cache, False):
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)

    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise TensorRTBuildError(f"TensorRT could not build {onnx_path} (see its log above)")
    write_atomic(out_path, lambda tmp: tmp.write_bytes(engine))
    if timing_cache is not None:
        serialized_cache = config.get_timing_cache().serialize()
        write_atomic(timing_cache, lambda tmp: tmp.write_bytes(serialized_cache))
    return out_path

