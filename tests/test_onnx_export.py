"""ONNX export of every component on tiny models: onnx.checker, then onnxruntime against eager
at two shapes of the profile (which proves the dynamic axes), the 8-bit Q/DQ block, the
bf16 graph, external data and the all-or-nothing write."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_parity

onnx = pytest.importorskip("onnx", reason="the ONNX export needs onnx (pip install 'wanrt[onnx]')")
pytest.importorskip("onnxruntime", reason="running exported graphs needs onnxruntime")

from wanrt.configs import get_task  # noqa: E402
from wanrt.export.onnx_export import (  # noqa: E402
    OnnxExportError,
    check_signature,
    export_onnx,
    run_onnxruntime,
)
from wanrt.export.quantize import (  # noqa: E402
    Kernel,
    PrecisionPolicy,
    QuantizedLinear,
    pin_kernel,
    quantize,
)
from wanrt.export.specs import VAE_STEPS, Component, export_module, make_spec  # noqa: E402
from wanrt.export.tensorrt_build import unsupported_by_tensorrt  # noqa: E402
from wanrt.models.dit import WanDiT  # noqa: E402
from wanrt.models.vae import WanVAE  # noqa: E402
from wanrt.random_weights import randomize_  # noqa: E402

# Two sizes and frame counts per task, so the profile's min and max shapes differ on every
# dynamic axis (latent frames, rows or columns, tokens).
RUNS = {"tiny-t2v": (["64*64", "96*64"], [5, 9]), "tiny-i2v": (["64*64", "96*64"], [5, 9]),
        "tiny-ti2v": (["128*64", "128*128"], [5, 9])}


def _model(task_name: str, component: Component):
    task = get_task(task_name)
    with torch.device("meta"):
        model = WanVAE(task.vae) if component in VAE_STEPS else WanDiT(task.dit)
    return task, randomize_(model, 0).eval()


def _spec(task, component: Component, model, per_token: bool = False):
    sizes, frame_nums = RUNS[task.name]
    return make_spec(component, model, task, sizes, frame_nums, per_token_timesteps=per_token)


def _inputs(spec, component: Component, model, which: str) -> tuple[torch.Tensor, ...]:
    """The spec's random inputs; a block gets its own weights (the streamed tensors), whose
    scale, unlike unit-variance noise, keeps activations realistic."""
    inputs = spec.example_inputs(which=which, seed=1)
    if component is Component.DIT_BLOCK:
        activations = len(spec.inputs) - len(model.blocks[0].state_dict())
        inputs = (*inputs[:activations], *model.blocks[0].state_dict().values())
    return inputs


def _check_against_eager(path, spec, component, model, whiches=("min", "max")) -> list[float]:
    module = export_module(component, model)
    errors = []
    for which in whiches:
        inputs = _inputs(spec, component, model, which)
        with torch.no_grad():
            expected = module(*inputs)
        actual = run_onnxruntime(path, spec, inputs)
        for tensor, got, want in zip(spec.outputs, actual, expected, strict=True):
            errors.append(assert_parity(got, want, f"{component.value} {tensor.name} at {which} shapes"))
    return errors


@pytest.mark.parametrize("task_name,component,per_token", [
    *(("tiny-t2v", component, False) for component in Component),
    ("tiny-i2v", Component.DIT_PRE, False),           # the image conditioning input y
    ("tiny-ti2v", Component.DIT_POST, False),         # 48 latent channels, the Wan2.2 patch grid
    ("tiny-ti2v", Component.VAE_DECODER_STEP, False),  # Wan2.2 VAE: patchify, DupUp3D
    ("tiny-ti2v", Component.VAE_ENCODER, False),       # AvgDown3D
    ("tiny-ti2v", Component.VAE_DECODER_FIRST_STEP, False),  # DupUp3D dropping the first chunk's copies
    ("tiny-ti2v", Component.VAE_ENCODER_FIRST_STEP, False),
    # ti2v with an image: per-token timesteps through the sinusoid, blocks and head.
    *(("tiny-ti2v", component, True) for component in (Component.DIT_PRE, Component.DIT_BLOCK, Component.DIT_POST)),
])
def test_component_matches_eager_in_onnxruntime(task_name, component, per_token, tmp_path):
    task, model = _model(task_name, component)
    spec = _spec(task, component, model, per_token)
    low, _, high = spec.profiles[0].shapes[spec.inputs[0].name]
    assert low != high, "the test needs two different shapes"
    path = export_onnx(spec, model, tmp_path / f"{component.value}.onnx")

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [v.name for v in proto.graph.input] == spec.input_names()
    errors = _check_against_eager(path, spec, component, model)
    # float32 graphs land at float32 rounding: ~1e-6 of the output scale.
    variant = " (per-token timesteps)" if per_token else ""
    print(f"{task_name} {component.value}{variant}: max abs diff vs eager {max(errors):.2e}")


@pytest.mark.parametrize("task_name,component,per_token", [
    *((task, component, False) for task in RUNS for component in Component),
    *(("tiny-ti2v", component, True) for component in (Component.DIT_PRE, Component.DIT_BLOCK, Component.DIT_POST)),
])
def test_every_graph_is_one_tensorrt_parses(task_name, component, per_token, tmp_path):
    """Checked against TensorRT 10's documented ONNX support, since no CI machine has
    TensorRT: its opsets and operators, constant axes, Resize modes, and no float64 (its
    parser would cast it to float32 without an error: the timestep sinusoid and RoPE are
    computed outside the graphs)."""
    task, model = _model(task_name, component)
    path = export_onnx(_spec(task, component, model, per_token), model, tmp_path / "graph.onnx")
    assert unsupported_by_tensorrt(onnx.load(str(path))) == []


@pytest.mark.parametrize("scheme,onnx_type", [("int8", "INT8"), ("fp8", "FLOAT8E4M3FN")])
def test_quantized_block_exports_as_qdq(scheme, onnx_type, tmp_path):
    task, dit = _model("tiny-t2v", Component.DIT_BLOCK)
    quantize(dit, scheme, PrecisionPolicy(keep_first_blocks=0, keep_last_blocks=0))
    block = dit.blocks[0]
    spec = _spec(task, Component.DIT_BLOCK, block)
    path = export_onnx(spec, block, tmp_path / f"block-{scheme}.onnx")

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    input_types = {v.name: onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type) for v in proto.graph.input}
    dequantized = [n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    quantized_weights = [f"{name}.weight" for name, module in block.named_modules()
                         if isinstance(module, QuantizedLinear)]
    assert sorted(dequantized) == sorted(quantized_weights) and len(dequantized) == 10
    assert {input_types[name] for name in dequantized} == {onnx_type}
    assert unsupported_by_tensorrt(proto) == []
    # The 8-bit weights and their scales are inputs: nothing of the block is baked in.
    baked = sum(len(t.raw_data) for t in proto.graph.initializer)
    assert baked < 1024, f"{baked} bytes of initializers in a weights-as-inputs graph"

    # The graph's arithmetic is the weight-only kernel's: x @ (q * s)^T + b.
    pin_kernel(block, Kernel.DEQUANT)
    errors = _check_against_eager(path, spec, Component.DIT_BLOCK, dit)
    print(f"{scheme} Q/DQ block: max abs diff vs the eager dequant kernel {max(errors):.2e}")


def test_one_block_graph_serves_every_block(tmp_path):
    """Exported from block 0, run with block 1's tensors: equals block 1 in eager mode."""
    task, dit = _model("tiny-t2v", Component.DIT_BLOCK)
    spec = _spec(task, Component.DIT_BLOCK, dit)
    path = export_onnx(spec, dit.blocks[0], tmp_path / "block.onnx")
    activations = spec.example_inputs(which="max", seed=2)[:5]
    other = dit.blocks[1]
    actual, = run_onnxruntime(path, spec, (*activations, *other.state_dict().values()))
    with torch.no_grad():
        expected = other(*activations)
    assert (expected - dit.blocks[0](*activations)).abs().max() > 0.1, "the blocks must differ"
    error = assert_parity(actual, expected, "block 1 through block 0's graph")
    print(f"block 1 via block 0's graph: max abs diff {error:.2e}")


def _upcast_bf16(proto) -> None:
    """Every bfloat16 of the graph (inputs, casts, constants) made float32, in place."""
    from onnx import numpy_helper

    bf16, f32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
    for value in proto.graph.input:
        if value.type.tensor_type.elem_type == bf16:
            value.type.tensor_type.elem_type = f32
    tensors = list(proto.graph.initializer)
    for node in proto.graph.node:
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == bf16:
                attribute.i = f32
            if attribute.type == onnx.AttributeProto.TENSOR:
                tensors.append(attribute.t)
    for tensor in tensors:
        if tensor.data_type == bf16:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype("float32"), tensor.name))
    del proto.graph.value_info[:]


def test_bf16_block_graph_computes_the_block(tmp_path):
    """onnxruntime has no bf16 MatMul on the CPU. The bf16 graph (what TensorRT builds for a
    bf16 model) with its bf16 types made float32 must compute the block with the same
    weights in float32: this checks the graph, its casts and float32 islands included,
    without bf16 rounding in the way."""
    task, dit = _model("tiny-t2v", Component.DIT_BLOCK)
    block16 = dit.blocks[0].to(torch.bfloat16)
    spec = _spec(task, Component.DIT_BLOCK, block16)
    proto = onnx.load(str(export_onnx(spec, block16, tmp_path / "block-bf16.onnx")))
    # The 27 block tensors and context_emb (the compute dtype) enter as bf16.
    assert sum(v.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16 for v in proto.graph.input) == 28
    _upcast_bf16(proto)
    upcast = tmp_path / "block-upcast.onnx"
    onnx.save(proto, str(upcast))

    block32 = dit.blocks[0].float()  # the bf16 weights, exactly, in float32
    spec32 = _spec(task, Component.DIT_BLOCK, block32)
    inputs = _inputs(spec32, Component.DIT_BLOCK, dit, "max")
    actual, = run_onnxruntime(upcast, spec32, inputs)
    with torch.no_grad():
        expected = block32(*inputs[:5])
    error = assert_parity(actual, expected, "bf16 graph, upcast")
    print(f"bf16 block graph (upcast) vs float32 eager: max abs diff {error:.2e}")


def test_external_data_round_trip(tmp_path):
    task, dit = _model("tiny-t2v", Component.DIT_PRE)
    spec = _spec(task, Component.DIT_PRE, dit)
    path = tmp_path / "pre.onnx"
    export_onnx(spec, dit, path, external_data_threshold=0)
    data = tmp_path / "pre.onnx.data"
    embeddings = sum(t.numel() * t.element_size() for name, t in dit.state_dict().items()
                     if name.split(".")[0] in ("patch_embedding", "text_embedding", "time_embedding",
                                               "time_projection"))
    # The weights live in the data file (tensors under 1 KiB stay inline).
    assert data.stat().st_size > 0.9 * embeddings > path.stat().st_size
    assert oct(data.stat().st_mode & 0o777) == oct(path.stat().st_mode & 0o777)
    onnx.checker.check_model(str(path), full_check=True)
    errors = _check_against_eager(path, spec, Component.DIT_PRE, dit, whiches=("max",))
    print(f"external data: max abs diff {max(errors):.2e}")

    export_onnx(spec, dit, path)  # small enough: one file, the stale data file goes
    assert not data.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pre.onnx"]


def test_failed_export_leaves_nothing(tmp_path):
    """A spec of another task (i2v takes y) does not fit the t2v model: the export raises
    and neither the graph nor a temporary folder remains."""
    task, t2v = _model("tiny-t2v", Component.DIT_PRE)
    _, i2v = _model("tiny-i2v", Component.DIT_PRE)
    spec = _spec(get_task("tiny-i2v"), Component.DIT_PRE, i2v)
    with pytest.raises(RuntimeError):
        export_onnx(spec, t2v, tmp_path / "pre.onnx")
    assert list(tmp_path.iterdir()) == []


def test_signature_check_names_a_dropped_input(tmp_path):
    task, dit = _model("tiny-t2v", Component.DIT_POST)
    spec = _spec(task, Component.DIT_POST, dit)
    proto = onnx.load(str(export_onnx(spec, dit, tmp_path / "post.onnx")))
    check_signature(proto.graph, spec, "post.onnx")
    del proto.graph.input[1]
    with pytest.raises(OnnxExportError, match="missing \\['time_emb'\\]"):
        check_signature(proto.graph, spec, "post.onnx")
