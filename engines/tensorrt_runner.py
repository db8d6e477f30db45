"""The `tensorrt` engine: serialized TensorRT engines (export/tensorrt_build.py) for the DiT pre,
block and post graphs and the VAE's causal steps.

`ArtifactEngine` finds the engine whose manifest matches the run and verifies its bytes
before anything is deserialized; this module only deserializes and runs it, through TensorRT
10/11's name-based I/O API (`set_input_shape`, `set_tensor_address`, `execute_async_v3` on
the current CUDA stream). The DIT_BLOCK engine takes the block's weights as inputs: the
tensors the block streamer has just placed on the device are bound by address, so one engine
runs every block of both experts without a copy. Written against the real API, not run in
wanrt's CI (no TensorRT there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from wanrt.engines.artifacts import ArtifactEngine, ArtifactRunner
from wanrt.engines.base import EngineKind
from wanrt.errors import InputError
from wanrt.export.build import TENSORRT_FILE, Backend
from wanrt.export.manifest import Manifest
from wanrt.export.specs import ExportSpec
from wanrt.export.tensorrt_build import Shapes, TensorRTBuildError, import_tensorrt

# setTensorAddress: "The pointer must have at least 256-byte alignment" (NvInferRuntime.h).
TENSOR_ALIGNMENT = 256


def select_profile(profiles: Sequence[Mapping[str, Shapes]], shapes: Mapping[str, tuple[int, ...]]) -> int:
    """The first optimization profile whose [min, max] holds every given input shape."""
    for index, profile in enumerate(profiles):
        if all(name not in profile or _within(shape, profile[name]) for name, shape in shapes.items()):
            return index
    raise InputError(f"input shapes {dict(shapes)} are outside every optimization profile of the engine; "
                     "export it again with --sizes/--frame-nums covering this run")


def _within(shape: tuple[int, ...], bounds: Shapes) -> bool:
    low, _, high = bounds
    return len(shape) == len(low) and all(lo <= s <= hi for s, lo, hi in zip(shape, low, high))


def _torch_dtypes(trt) -> dict:
    return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
            trt.int64: torch.int64, trt.int32: torch.int32, trt.int8: torch.int8,
            trt.fp8: torch.float8_e4m3fn, trt.bool: torch.bool}


class TensorRTRunner:
    """One deserialized engine and its execution context: called with the spec's inputs
    (device tensors, positionally), returns the spec's outputs, queued on the current stream."""

    def __init__(self, path: Path, spec: ExportSpec, device: torch.device) -> None:
        trt = import_tensorrt()
        self.spec = spec
        self.device = device
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        with torch.cuda.device(device):
            self.engine = self._runtime.deserialize_cuda_engine(Path(path).read_bytes())
            if self.engine is None:
                raise TensorRTBuildError(f"{path}: TensorRT could not deserialize the engine; rebuild it")
            self.context = self.engine.create_execution_context()
        dtypes = _torch_dtypes(trt)
        io = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        for tensor in (*spec.inputs, *spec.outputs):
            if tensor.name not in io or dtypes.get(self.engine.get_tensor_dtype(tensor.name)) != tensor.dtype:
                raise TensorRTBuildError(f"{path}: the engine's tensor {tensor.name} is not the spec's "
                                         f"{tensor.dtype}; rebuild it")
        dynamic = [t.name for t in spec.inputs if -1 in tuple(self.engine.get_tensor_shape(t.name))]
        self.profiles = [{name: tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(name, index))
                          for name in dynamic} for index in range(self.engine.num_optimization_profiles)]
        self.active_profile = 0  # a new context starts on profile 0

    def __call__(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        spec, context = self.spec, self.context
        stream = torch.cuda.current_stream(self.device).cuda_stream
        index = select_profile(self.profiles, spec.input_shapes(inputs))
        if index != self.active_profile:
            context.set_optimization_profile_async(index, stream)
            self.active_profile = index
        bound = []  # keeps copies made for alignment alive until the work is queued
        for tensor, value in zip(spec.inputs, inputs, strict=True):
            if value.dtype != tensor.dtype or value.device != self.device:
                raise InputError(f"engine input {tensor.name}: {value.dtype} on {value.device}, "
                                 f"the engine takes {tensor.dtype} on {self.device}")
            if not value.is_contiguous() or value.data_ptr() % TENSOR_ALIGNMENT:
                value = value.clone(memory_format=torch.contiguous_format)
            bound.append(value)
            context.set_input_shape(tensor.name, tuple(value.shape))
            context.set_tensor_address(tensor.name, value.data_ptr())
        outputs = tuple(torch.empty(tuple(context.get_tensor_shape(t.name)), dtype=t.dtype, device=self.device)
                        for t in spec.outputs)
        for tensor, value in zip(spec.outputs, outputs):
            context.set_tensor_address(tensor.name, value.data_ptr())
        if not context.execute_async_v3(stream):
            raise RuntimeError(f"TensorRT failed to run the {spec.component.value} engine (see its log)")
        return outputs


class TensorRTEngine(ArtifactEngine):
    kind = EngineKind.TENSORRT
    backend = Backend.TENSORRT

    def load(self, directory: Path, manifest: Manifest, spec: ExportSpec) -> ArtifactRunner:
        return TensorRTRunner(Path(directory) / TENSORRT_FILE, spec, self.options.device)
