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


def float64_tensors(proto) -> list[str]:
    """Names of the graph's float64 tensors, casts and constants. TensorRT has no float64:
    its parser casts DOUBLE down to FLOAT without failing, which would silently move float64
    math (the timestep sinusoid's phases) to float32."""
    onnx = require_onnx()
    double = onnx.TensorProto.DOUBLE
    graph = onnx.shape_inference.infer_shapes(proto).graph
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


def check_no_float64(proto, source: str) -> None:
    found = float64_tensors(proto)
    if found:
        raise TensorRTBuildError(f"{source} computes in float64 ({', '.join(found[:3])}), which TensorRT would "
                                 "cast to float32: compute it outside the graph and pass the result in")


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
    are the spec's, it has no float64, its 8-bit weights (if any) are of the `precision`
    scheme, and every profile fits it.
    """
    onnx = require_onnx()
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    proto = onnx.load(str(onnx_path), load_external_data=False)
    check_signature(proto.graph, spec, str(onnx_path))
    check_no_float64(proto, str(onnx_path))
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

