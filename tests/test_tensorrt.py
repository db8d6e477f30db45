"""TensorRT: everything up to the builder call runs on the CPU (profiles, precision checks, the
missing-TensorRT error, the build logic against TensorRT's documented rules); the engine
build and run itself needs TensorRT and a GPU and skips, saying so, without them."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_parity

onnx = pytest.importorskip("onnx", reason="the TensorRT path starts from ONNX (pip install 'wanrt[onnx]')")

from wanrt.configs import get_task  # noqa: E402
from wanrt.engines.base import EngineOptions, make_engine  # noqa: E402
from wanrt.engines.tensorrt_runner import select_profile  # noqa: E402
from wanrt.errors import InputError, WanrtError  # noqa: E402
from wanrt.export.onnx_export import export_onnx  # noqa: E402
from wanrt.export.quantize import PrecisionPolicy, quantize  # noqa: E402
from wanrt.export.specs import Component, ShapeProfile, export_module, make_spec  # noqa: E402
from wanrt.export.tensorrt_build import (  # noqa: E402
    TENSORRT_MISSING,
    TensorRTBuildError,
    TensorRTUnavailableError,
    build_tensorrt_engine,
    check_precision,
    graph_weight_scheme,
    import_tensorrt,
    optimization_profiles,
    unsupported_by_tensorrt,
)
from wanrt.models.dit import WanDiT  # noqa: E402
from wanrt.models.vae import WanVAE  # noqa: E402
from wanrt.random_weights import randomize_  # noqa: E402

TASK = get_task("tiny-t2v")
SIZES, FRAME_NUMS = ["64*64", "96*64"], [5, 9]
# tiny-t2v: VAE stride (4, 8, 8), patch (1, 2, 2), dim 64, 4 heads of 16. 64*64 with 5
# frames is 2 x 4 x 4 = 32 tokens (the first run: opt); 96*64 with 9 frames is 3 x 4 x 6 = 72.
TOKENS = (32, 32, 72)


def _dit(scheme: str | None = None) -> WanDiT:
    with torch.device("meta"):
        dit = WanDiT(TASK.dit)
    dit = randomize_(dit, 0).eval()
    if scheme is not None:
        quantize(dit, scheme, PrecisionPolicy(keep_first_blocks=0, keep_last_blocks=0))
    return dit


@pytest.fixture(scope="module")
def block_graph(tmp_path_factory):
    """(spec, path) of the float32 tiny DIT_BLOCK graph."""
    dit = _dit()
    spec = make_spec(Component.DIT_BLOCK, dit, TASK, SIZES, FRAME_NUMS)
    return spec, export_onnx(spec, dit, tmp_path_factory.mktemp("onnx") / "block.onnx")


# ---------------------------------------------------------------------------- no TensorRT


def test_missing_tensorrt_is_one_actionable_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # what `import` sees when it is absent
    with pytest.raises(TensorRTUnavailableError) as error:
        import_tensorrt()
    assert str(error.value) == TENSORRT_MISSING
    assert "\n" not in TENSORRT_MISSING and "pip install 'wanrt[tensorrt]'" in TENSORRT_MISSING
    assert isinstance(error.value, WanrtError)  # the CLI prints it as one line, exit 2
    # The runtime engine refuses the same way, before any model is touched.
    options = EngineOptions(task=TASK, device=torch.device("cuda"))
    with pytest.raises(TensorRTUnavailableError, match="TensorRT is not installed"):
        make_engine("tensorrt", options)


def test_cli_without_tensorrt_exits_2_with_one_line(monkeypatch, tmp_path, cache_dir, checkpoints):
    """`wanrt export --backend tensorrt` and `wanrt generate --engine tensorrt` say what is
    missing before loading anything, and write nothing."""
    from typer.testing import CliRunner

    from wanrt.cli.app import app

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    common = ["--task", "tiny-t2v", "--ckpt-dir", checkpoints["tiny-t2v"], "--device", "cpu"]
    for args in (["export", "--backend", "tensorrt", "--out", tmp_path / "engines"],
                 ["generate", "--engine", "tensorrt", "--prompt", "a cat", "--output", tmp_path / "out.mp4"]):
        result = CliRunner().invoke(app, [str(arg) for arg in [*args, *common]])
        assert result.exit_code == 2, result.output
        assert result.stderr.strip() == f"error: {TENSORRT_MISSING}"
    assert not (tmp_path / "engines").exists() and not (tmp_path / "out.mp4").exists()


def test_old_tensorrt_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(TensorRTUnavailableError, match="8.6.1 is too old"):
        import_tensorrt()


def test_optimization_profiles_cover_every_dynamic_input(block_graph):
    spec, path = block_graph
    graph = onnx.load(str(path)).graph
    head = TASK.dit.head_dim // 2
    expected = {"x": tuple((1, n, TASK.dit.dim) for n in TOKENS),
                "rope_cos": tuple((n, 1, head) for n in TOKENS),
                "rope_sin": tuple((n, 1, head) for n in TOKENS)}
    # time_mod, context_emb and the 27 weight inputs are static: TensorRT takes their shape
    # from the network, and a profile entry for them would be redundant.
    assert optimization_profiles(spec, graph) == [expected]


def test_optimization_profiles_refuse_what_tensorrt_would(block_graph):
    spec, path = block_graph
    graph = onnx.load(str(path)).graph
    shapes = dict(spec.profiles[0].shapes)

    def profile_with(name, triple):
        return dataclasses.replace(spec, profiles=(ShapeProfile("bad", {**shapes, name: triple}),))

    with pytest.raises(TensorRTBuildError, match="min <= opt <= max"):
        optimization_profiles(profile_with("x", ((1, 72, 64), (1, 32, 64), (1, 32, 64))), graph)
    with pytest.raises(TensorRTBuildError, match="axis 2 is 64 in the graph"):
        optimization_profiles(profile_with("x", ((1, 32, 32), (1, 32, 32), (1, 72, 32))), graph)
    with pytest.raises(TensorRTBuildError, match="rank 3"):
        optimization_profiles(profile_with("x", ((32, 64),) * 3), graph)


def test_precision_check_reads_the_graphs_weights(tmp_path, block_graph):
    _, float_path = block_graph
    assert graph_weight_scheme(onnx.load(str(float_path))).value == "bf16"  # unquantized
    for scheme in ("int8", "fp8"):
        dit = _dit(scheme)
        spec = make_spec(Component.DIT_BLOCK, dit, TASK, SIZES, FRAME_NUMS)
        proto = onnx.load(str(export_onnx(spec, dit, tmp_path / f"{scheme}.onnx")))
        assert graph_weight_scheme(proto).value == scheme
        check_precision(proto, scheme, "block")
        other = "fp8" if scheme == "int8" else "int8"
        for wrong in (other, "bf16"):
            with pytest.raises(TensorRTBuildError, match=f"holds {scheme} weights but {wrong} was asked"):
                check_precision(proto, wrong, "block")
    # Graphs without 8-bit weights (VAE, pre/post, kept blocks) build under any scheme.
    check_precision(onnx.load(str(float_path)), "fp8", "block")


def test_select_profile_picks_the_covering_one():
    profiles = [{"x": ((1, 32, 64), (1, 32, 64), (1, 72, 64))},
                {"x": ((1, 73, 64), (1, 100, 64), (1, 200, 64))}]
    assert select_profile(profiles, {"x": (1, 48, 64), "w": (64, 64)}) == 0
    assert select_profile(profiles, {"x": (1, 150, 64)}) == 1
    with pytest.raises(InputError, match="outside every optimization profile"):
        select_profile(profiles, {"x": (1, 201, 64)})


# ---------------------------------------------------------------------------- build logic


class _TensorRTRules(types.ModuleType):
    """The part of TensorRT's Python API `build_tensorrt_engine` uses, enforcing what the real
    one documents: a dynamic network input needs (min, opt, max) in every optimization
    profile, with min <= opt <= max and the network's static dims; precision comes from a
    strongly typed network; the timing cache is created from the bytes given. The "engine"
    is a JSON record of what was built."""

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 0

    class MemoryPoolType:
        WORKSPACE = 0

    def __init__(self):
        super().__init__("tensorrt")
        self.__version__ = "10.8.0"
        rules = self

        class Network:
            def __init__(self, flags):
                self.flags, self.inputs = flags, {}

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger):
                self.network = network

            def parse_from_file(self, path):
                for value in onnx.load(path, load_external_data=False).graph.input:
                    dims = value.type.tensor_type.shape.dim
                    self.network.inputs[value.name] = tuple(d.dim_value if d.HasField("dim_value") else -1
                                                            for d in dims)
                return True

        class TimingCache:
            def __init__(self, data):
                self.data = data

            def serialize(self):
                return self.data + b"+timings"

        class Config:
            def __init__(self):
                self.profiles, self.cache = [], None

            def create_timing_cache(self, data):
                rules.cache_loaded = bytes(data)
                return TimingCache(bytes(data))

            def set_timing_cache(self, cache, ignore_mismatch):
                self.cache = cache
                return True

            def get_timing_cache(self):
                return self.cache

            def add_optimization_profile(self, profile):
                self.profiles.append(profile.shapes)

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, low, opt, high):
                self.shapes[name] = (tuple(low), tuple(opt), tuple(high))

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return Network(flags)

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                if not network.flags & (1 << int(rules.NetworkDefinitionCreationFlag.STRONGLY_TYPED)):
                    return None
                dynamic = {name: dims for name, dims in network.inputs.items() if -1 in dims}
                if dynamic and not config.profiles:
                    return None
                for shapes in config.profiles:
                    for name, dims in dynamic.items():
                        if name not in shapes:
                            return None
                        low, opt, high = shapes[name]
                        for axis, dim in enumerate(dims):
                            if not (low[axis] <= opt[axis] <= high[axis]) or (dim != -1 and low[axis] != dim):
                                return None
                return json.dumps({"profiles": config.profiles}).encode()

        self.OnnxParser, self.Builder = OnnxParser, Builder


def test_build_sets_every_profile_and_keeps_the_timing_cache(block_graph, tmp_path, monkeypatch):
    spec, path = block_graph
    rules = _TensorRTRules()
    monkeypatch.setitem(sys.modules, "tensorrt", rules)
    # A second profile for longer runs: up to 144 tokens.
    head = TASK.dit.head_dim // 2
    wide = dict(spec.profiles[0].shapes)
    wide["x"] = (*wide["x"][:2], (1, 144, TASK.dit.dim))
    wide["rope_cos"] = wide["rope_sin"] = (*wide["rope_cos"][:2], (144, 1, head))
    spec = dataclasses.replace(spec, profiles=(*spec.profiles, ShapeProfile("wide", wide)))
    cache = tmp_path / "timing.cache"

    engine = build_tensorrt_engine(path, spec, tmp_path / "block.plan", "bf16", timing_cache=cache)
    built = json.loads(engine.read_bytes())
    assert [set(p) for p in built["profiles"]] == [{"x", "rope_cos", "rope_sin"}] * 2
    assert [tuple(map(tuple, p["x"])) for p in built["profiles"]] == [
        tuple((1, n, 64) for n in TOKENS), ((1, 32, 64), (1, 32, 64), (1, 144, 64))]
    assert rules.cache_loaded == b"" and cache.read_bytes() == b"+timings"

    build_tensorrt_engine(path, spec, tmp_path / "block.plan", "bf16", timing_cache=cache)
    assert rules.cache_loaded == b"+timings"  # the second build starts from the first one's timings
    assert cache.read_bytes() == b"+timings+timings"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block.plan", "timing.cache"]


def test_build_checks_the_graph_before_tensorrt(block_graph, tmp_path, monkeypatch):
    """A graph that is not the spec's fails on the CPU, with TensorRT never imported."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    spec, path = block_graph
    vae_spec = make_spec(Component.VAE_DECODER_STEP, randomize_(WanVAE(TASK.vae), 0), TASK, SIZES, FRAME_NUMS)
    with pytest.raises(WanrtError, match="differ from the spec"):
        build_tensorrt_engine(path, vae_spec, tmp_path / "x.plan", "bf16")
    with pytest.raises(TensorRTUnavailableError):
        build_tensorrt_engine(path, spec, tmp_path / "x.plan", "bf16")
    assert not (tmp_path / "x.plan").exists()


def _rewired(path, tmp_path, name: str, *nodes) -> Path:
    """The graph at `path` with `nodes` (reading the first input, writing `rewired`) put in
    front, and every other reader of that input reading `rewired` instead."""
    proto = onnx.load(str(path))
    first = proto.graph.input[0].name
    for index, node in enumerate(nodes):
        proto.graph.node.insert(index, node)
    for node in proto.graph.node[len(nodes):]:
        node.input[:] = ["rewired" if item == first else item for item in node.input]
    out = tmp_path / f"{name}.onnx"
    onnx.save(proto, str(out))
    return out


def _node(op, inputs, outputs, **attributes):
    return onnx.helper.make_node(op, inputs, outputs, name=f"{op.lower()}_node", **attributes)


def _constant(name, values):
    return onnx.helper.make_node("Constant", [], [name], name=f"{name}_node",
                                 value=onnx.numpy_helper.from_array(np.array(values, dtype=np.int64), name))


@pytest.mark.parametrize("case, needle", [
    # What an exporter gives for float64 math inside a graph (the official timestep sinusoid).
    ("float64", "x_as_float64: float64 (TensorRT would cast it to float32"),
    ("custom operator", "Foo foo_node: operator not supported"),
    ("unsupported operator", "Unique unique_node: operator not supported"),
    ("computed axes", "Unsqueeze unsqueeze_node: its axes are computed"),
    ("cubic resize", "Resize resize_node: mode 'cubic' is not implemented"),
])
def test_a_graph_tensorrt_cannot_parse_is_refused_before_tensorrt(block_graph, tmp_path, monkeypatch, case, needle):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    spec, path = block_graph
    x = onnx.load(str(path)).graph.input[0].name
    nodes = {
        "float64": [_node("Cast", [x], ["x_as_float64"], to=onnx.TensorProto.DOUBLE),
                    _node("Identity", ["x_as_float64"], ["x_f64"]), _node("CastLike", ["x_f64", x], ["rewired"])],
        "custom operator": [onnx.helper.make_node("Foo", [x], ["rewired"], name="foo_node", domain="com.example")],
        "unsupported operator": [_node("Unique", [x], ["rewired"])],
        "computed axes": [_constant("zero", [0]), _node("Shape", [x], ["x_shape"]),
                          _node("Gather", ["x_shape", "zero"], ["computed_axes"]),
                          _node("Unsqueeze", [x, "computed_axes"], ["x_unsqueezed"]),
                          _node("Squeeze", ["x_unsqueezed", "zero"], ["rewired"])],
        "cubic resize": [_node("Resize", [x, "", "", "x_shape_for_resize"], ["rewired"], mode="cubic"),
                         _node("Shape", [x], ["x_shape_for_resize"])],
    }[case]
    damaged = _rewired(path, tmp_path, case.replace(" ", "_"), *nodes)
    with pytest.raises(TensorRTBuildError, match="cannot be built by TensorRT") as error:
        build_tensorrt_engine(damaged, spec, tmp_path / "x.plan", "bf16")
    assert needle in str(error.value) and "\n" not in str(error.value)
    assert unsupported_by_tensorrt(onnx.load(str(path))) == []
    assert not (tmp_path / "x.plan").exists()


# ---------------------------------------------------------------------------- real TensorRT


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT engines need a CUDA GPU")
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None,
                    reason="TensorRT is not installed (pip install 'wanrt[tensorrt]' with NVIDIA's wheels)")
@pytest.mark.parametrize("scheme", [None, "int8", "fp8"])
def test_tensorrt_block_engine_matches_eager(scheme, tmp_path):
    from wanrt.engines.tensorrt_runner import TensorRTRunner
    from wanrt.export.quantize import Kernel, pin_kernel

    device = torch.device("cuda")
    if scheme == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9+")
    dit = _dit(scheme).to(device)
    block = dit.blocks[0]
    spec = make_spec(Component.DIT_BLOCK, block, TASK, SIZES, FRAME_NUMS)
    graph = export_onnx(spec, block, tmp_path / "block.onnx")
    engine = build_tensorrt_engine(graph, spec, tmp_path / "block.plan", scheme or "bf16",
                                   timing_cache=tmp_path / "timing.cache")
    runner = TensorRTRunner(engine, spec, device)
    pin_kernel(block, Kernel.DEQUANT)  # the graph's weight-only arithmetic
    for which in ("min", "max"):
        inputs = (*spec.example_inputs(which=which, device=device)[:5], *block.state_dict().values())
        actual, = runner(*inputs)
        with torch.no_grad():
            expected, = export_module(Component.DIT_BLOCK, block)(*inputs)
        # TensorRT runs float32 GEMMs in TF32 unless told otherwise.
        error = assert_parity(actual.cpu(), expected.cpu(), f"tensorrt {scheme or 'float32'} block {which}",
                              rtol=5e-3)
        print(f"tensorrt {scheme or 'float32'} block at {which} shapes: max abs diff {error:.2e}")
