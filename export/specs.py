"""Export specs: what each exported component takes and returns, and for which shapes.

One spec per component (the TensorRT demo's `get_input_profile` pattern): input and output
names, dtypes, dynamic axes and one (min, opt, max) shape profile derived from the sizes and
frame counts the user asks for. `export_module` re-expresses a built model as a module whose
forward takes exactly the spec's inputs, positionally, and returns the spec's outputs; every
exporter (AOTInductor, ONNX/TensorRT) traces that module, so they all agree on the interface.

Axis names: a `str` in a shape names a dynamic axis. `"tokens"` is the DiT sequence length;
spatial axes are a base name times an integer factor, written `"<base>_x<k>"` (e.g.
`"latent_rows_x16"` is 16 * latent_rows), so exporters that need a symbolic relation between
axes (torch.export derived dims) can rebuild it with `parse_axis`. The batch is always 1: CFG
runs the conditional and unconditional forwards one after the other.

Components and what the runtime does around them:
* DIT_PRE, DIT_BLOCK and DIT_POST come in two variants of the same graph (`make_spec`'s
  `per_token_timesteps`): one timestep for all tokens (time tensors with a time axis of 1),
  or one per token (ti2v with an image: the time axis is the token axis).
* No graph computes in float64, which TensorRT lacks (its ONNX parser silently casts DOUBLE
  to FLOAT): the float64 math is done outside and its float32 results are inputs, the
  timestep sinusoid of DIT_PRE (`WanDiT.time_sinusoid`) and the RoPE tables of every block
  (`rope_tables`). A float32 sinusoid would be off by ~1e-4 rad at t≈1000.
* DIT_BLOCK takes the block's weights as inputs, so one artifact serves every block of both
  experts and the block streamer's weights flow straight in.
* DIT_POST receives the patch grid through the shape of `grid` (its values are never read):
  shapes alone then fix the unpatchified output.
* VAE_DECODER_STEP / VAE_ENCODER are the steady-state causal steps (one latent frame in, 4
  frames out; 4 frames in, one latent frame out), the feature cache explicit.
  VAE_DECODER_FIRST_STEP / VAE_ENCODER_FIRST_STEP are the first step of a video: one frame
  in, no cache in (the causal padding is zeros and the temporal resamplers pass the first
  frame through), the first cache out. Every later step takes a cache of the same shapes.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor, nn
from torch.nn.utils import stateless

from wanrt.configs import SIZES, ModelType, TaskSpec, parse_size
from wanrt.errors import InputError
from wanrt.models.dit import DiTBlock, DiTInputs, WanDiT
from wanrt.models.vae import FRAMES_PER_ENCODE_STEP, WanVAE

BATCH = 1
TOKENS_AXIS = "tokens"
FRAMES_AXIS = "latent_frames"
_SCALED_AXIS = re.compile(r"(?P<base>[a-z_]+?)_x(?P<factor>\d+)")


class Component(str, Enum):
    DIT_PRE = "dit_pre"
    DIT_BLOCK = "dit_block"
    DIT_POST = "dit_post"
    VAE_DECODER_STEP = "vae_decoder_step"
    VAE_ENCODER = "vae_encoder"
    VAE_DECODER_FIRST_STEP = "vae_decoder_first_step"
    VAE_ENCODER_FIRST_STEP = "vae_encoder_first_step"


@dataclass(frozen=True)
class VAEStep:
    """Which causal step of the VAE a component is."""

    decode: bool
    first: bool


VAE_STEPS: Mapping[Component, VAEStep] = {
    Component.VAE_DECODER_STEP: VAEStep(decode=True, first=False),
    Component.VAE_ENCODER: VAEStep(decode=False, first=False),
    Component.VAE_DECODER_FIRST_STEP: VAEStep(decode=True, first=True),
    Component.VAE_ENCODER_FIRST_STEP: VAEStep(decode=False, first=True),
}


_VAE_STEP_COMPONENTS = {step: component for component, step in VAE_STEPS.items()}


def vae_step_component(decode: bool, first: bool) -> Component:
    return _VAE_STEP_COMPONENTS[VAEStep(decode, first)]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]   # a str names a dynamic axis
    dtype: torch.dtype


@dataclass(frozen=True)
class ShapeProfile:
    """One optimization profile: (min, opt, max) concrete shape per input."""

    name: str
    shapes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def covers(self, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        """Whether every given input shape lies within [min, max] on every axis."""
        for name, shape in shapes.items():
            if name not in self.shapes:
                return False
            low, _, high = self.shapes[name]
            if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high)):
                return False
        return True

    def to_json(self) -> dict:
        return {"name": self.name,
                "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()}}

    @classmethod
    def from_json(cls, raw: Mapping) -> "ShapeProfile":
        return cls(raw["name"], {k: tuple(tuple(s) for s in v) for k, v in raw["shapes"].items()})


_WHICH = {"min": 0, "opt": 1, "max": 2}


@dataclass(frozen=True)
class ExportSpec:
    component: Component
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profiles: tuple[ShapeProfile, ...]

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """`{tensor name: {axis index: axis name}}` for inputs and outputs (torch.onnx format)."""
        axes = {}
        for tensor in (*self.inputs, *self.outputs):
            named = {i: dim for i, dim in enumerate(tensor.shape) if isinstance(dim, str)}
            if named:
                axes[tensor.name] = named
        return axes

    def example_inputs(self, profile: ShapeProfile | None = None, which: str = "opt",
                       device: torch.device | str = "cpu", seed: int = 0) -> tuple[Tensor, ...]:
        """Random inputs of one profile shape, positional in `inputs` order.

        Values are in plausible ranges (sinusoids in [-1, 1], positive quantization scales,
        RoPE cos/sin of real angles) so that traced graphs see no degenerate input.
        """
        profile = profile or self.profiles[0]
        generator = torch.Generator().manual_seed(seed)
        return tuple(_random_tensor(t, profile.shapes[t.name][_WHICH[which]], generator).to(device)
                     for t in self.inputs)

    def input_shapes(self, tensors: Sequence[Tensor]) -> dict[str, tuple[int, ...]]:
        return {t.name: tuple(x.shape) for t, x in zip(self.inputs, tensors)}


def parse_axis(name: str) -> tuple[str, int]:
    """`"latent_rows_x16"` -> `("latent_rows", 16)`; an unscaled name has factor 1."""
    match = _SCALED_AXIS.fullmatch(name)
    return (match["base"], int(match["factor"])) if match else (name, 1)


def scaled_axis(base: str, factor: int) -> str:
    return base if factor == 1 else f"{base}_x{factor}"


def _random_tensor(spec: TensorSpec, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    if spec.name == "time_sinusoid":
        return (torch.rand(shape, generator=generator) * 2 - 1).to(spec.dtype)
    if spec.dtype == torch.int8:
        return torch.randint(-127, 128, shape, generator=generator, dtype=torch.int8)
    if spec.name.endswith("weight_scale"):
        return torch.rand(shape, generator=generator) * 1e-2 + 1e-3
    if spec.name in ("rope_cos", "rope_sin"):
        angles = torch.rand(shape, generator=generator, dtype=torch.float64) * 6.3
        return (torch.cos(angles) if spec.name == "rope_cos" else torch.sin(angles)).float()
    return torch.randn(shape, generator=generator).to(spec.dtype)


# ---------------------------------------------------------------------------- modules


def compute_dtype_of(model: nn.Module) -> torch.dtype:
    """The dtype the model's matmuls run in: that of its Linear biases (every Wan Linear has
    one; quantized Linears keep theirs unquantized). float32 models compute in float32."""
    for name, tensor in model.named_parameters():
        if name.endswith("bias") and tensor.dtype.is_floating_point and tensor.element_size() > 1:
            return tensor.dtype
    return torch.float32


def _autocast(device: torch.device, dtype: torch.dtype):
    """The pipeline runs bf16 models under autocast; exported graphs carry the same casts."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def block_tensor_names(block: nn.Module) -> list[str]:
    """The block's parameters and buffers in state-dict order: the weight inputs of DIT_BLOCK."""
    return list(block.state_dict(keep_vars=True))


def sharing(model: nn.Module, children: Sequence[str]) -> nn.Module:
    """A shallow copy of `model` that shares only the named children.

    Exported graphs bake in every tensor of the module they trace: the pre and post graphs
    must hold the embeddings and the head, not 40 blocks, and the VAE decoder step not the
    encoder. The copy's methods are the model's own (`embed`, `decode_step`), unchanged.
    """
    shell = copy.copy(model)
    shell._modules = {name: child for name, child in model._modules.items() if name in children}
    return shell


# What each graph reads of its model (the remaining children are left out of the graph).
DIT_PRE_CHILDREN = ("patch_embedding", "text_embedding", "time_embedding", "time_projection")
DIT_POST_CHILDREN = ("head",)
VAE_DECODE_CHILDREN = ("conv2", "decoder")
VAE_ENCODE_CHILDREN = ("encoder", "conv1")


class _DiTPre(nn.Module):
    def __init__(self, dit: WanDiT) -> None:
        super().__init__()
        self.dit = sharing(dit, DIT_PRE_CHILDREN)
        self.dtype = compute_dtype_of(self.dit)

    def forward(self, x: Tensor, time_sinusoid: Tensor, context: Tensor, y: Tensor | None = None):
        # WanDiT.embed without its float64 parts (the sinusoid is an input, RoPE is outside).
        with _autocast(x.device, self.dtype):
            tokens, _, _ = WanDiT.embed_video(self.dit, x, y)
            time_emb, time_mod = WanDiT.embed_time(self.dit, time_sinusoid)
            return tokens, time_emb, time_mod, WanDiT.embed_text(self.dit, context)


class _DiTBlockWithWeightInputs(nn.Module):
    def __init__(self, block: DiTBlock) -> None:
        super().__init__()
        # Held outside the module tree: its own tensors are never read (every call passes a
        # block's tensors in), and registered ones would be lifted and baked into artifacts.
        object.__setattr__(self, "block", block)
        self.names = block_tensor_names(block)
        self.dtype = compute_dtype_of(block)

    def forward(self, x: Tensor, time_mod: Tensor, context: Tensor, rope_cos: Tensor,
                rope_sin: Tensor, *weights: Tensor) -> tuple[Tensor]:
        tensors = dict(zip(self.names, weights, strict=True))
        # What torch.func.functional_call does, spelled out: the TorchScript tracer behind the
        # ONNX export refuses functional_call itself; torch.export traces either form. The
        # class's forward, not `block(...)`: an engine may have replaced the instance's
        # forward and the block streamer hooks `__call__`; the graph must be the plain math.
        with _autocast(x.device, self.dtype), stateless._reparametrize_module(self.block, tensors):
            out = DiTBlock.forward(self.block, x, time_mod, context, rope_cos, rope_sin)
        return (out,)


class _DiTPost(nn.Module):
    def __init__(self, dit: WanDiT) -> None:
        super().__init__()
        self.dit = sharing(dit, DIT_POST_CHILDREN)
        self.dtype = compute_dtype_of(self.dit)

    def forward(self, tokens: Tensor, time_emb: Tensor, grid: Tensor) -> tuple[Tensor]:
        inputs = DiTInputs(tokens, time_emb, None, None, None, None, None, tuple(grid.shape))
        with _autocast(tokens.device, self.dtype):
            return (WanDiT.unembed(self.dit, tokens, inputs),)


class _VAEStep(nn.Module):
    def __init__(self, vae: WanVAE, step: VAEStep) -> None:
        super().__init__()
        self.vae = sharing(vae, VAE_DECODE_CHILDREN if step.decode else VAE_ENCODE_CHILDREN)
        self.step = step

    def forward(self, x: Tensor, *cache: Tensor) -> tuple[Tensor, ...]:
        # Class functions: an engine may route the instance's steps to artifacts.
        run = WanVAE.decode_step if self.step.decode else WanVAE.encode_step
        out, next_cache = run(self.vae, x, None if self.step.first else list(cache))
        return (out, *next_cache)


def _expect(model: nn.Module, kind: type, component: Component) -> None:
    if not isinstance(model, kind):
        raise TypeError(f"{component.value} exports a {kind.__name__}, got {type(model).__name__}")


def export_module(component: Component, model: nn.Module) -> nn.Module:
    """A plain module whose forward takes the spec's inputs positionally, in order, and
    returns a tuple of the spec's outputs.

    DIT_BLOCK takes a DiTBlock (a WanDiT gives its first block; all blocks share the
    structure) and its parameters become inputs (`torch.func.functional_call`), so one
    artifact serves every block of both experts. Quantized blocks export their stored
    weight and scale (export/quantize.py `QuantizedLinear`) as inputs.
    """
    component = Component(component)
    if component is Component.DIT_BLOCK:
        block = model.blocks[0] if isinstance(model, WanDiT) else model
        _expect(block, DiTBlock, component)
        return _DiTBlockWithWeightInputs(block)
    if component in (Component.DIT_PRE, Component.DIT_POST):
        _expect(model, WanDiT, component)
        return _DiTPre(model) if component is Component.DIT_PRE else _DiTPost(model)
    _expect(model, WanVAE, component)
    return _VAEStep(model, VAE_STEPS[component])


# ---------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class _Range:
    """min / opt / max of one named axis over the requested runs."""

    low: int
    opt: int
    high: int

    @classmethod
    def of(cls, values: Sequence[int]) -> "_Range":
        return cls(min(values), values[0], max(values))

    def scaled(self, factor: int) -> "_Range":
        return _Range(self.low * factor, self.opt * factor, self.high * factor)


def latent_grids(task: TaskSpec, sizes: Sequence[str], frame_nums: Sequence[int]) -> list[tuple[int, int, int]]:
    """(latent frames, rows, cols) of every requested (size, frame count), first = opt."""
    if not sizes or not frame_nums:
        raise InputError("--sizes and --frame-nums need at least one value each")
    stride_t, stride_h, stride_w = task.vae_stride
    _, patch_h, patch_w = task.dit.patch_size
    grids = []
    for size in sizes:
        width, height = SIZES.get(size) or parse_size(size)
        if height % (stride_h * patch_h) or width % (stride_w * patch_w):
            raise InputError(f"--sizes {size}: width and height must be multiples of "
                             f"{stride_w * patch_w} and {stride_h * patch_h}")
        for frame_num in frame_nums:
            if frame_num < 1 or (frame_num - 1) % stride_t:
                raise InputError(f"--frame-nums {frame_num} must be 4n+1 (e.g. 81, 121)")
            grids.append(((frame_num - 1) // stride_t + 1, height // stride_h, width // stride_w))
    return grids


def _profile_name(sizes: Sequence[str], frame_nums: Sequence[int]) -> str:
    return f"sizes={','.join(sizes)};frame_nums={','.join(map(str, frame_nums))}"


def _shape_triple(shape: tuple[int | str, ...], ranges: Mapping[str, _Range]):
    def concrete(pick) -> tuple[int, ...]:
        dims = []
        for dim in shape:
            if isinstance(dim, int):
                dims.append(dim)
            else:
                base, factor = parse_axis(dim)
                dims.append(pick(ranges[base]) * factor)
        return tuple(dims)
    return concrete(lambda r: r.low), concrete(lambda r: r.opt), concrete(lambda r: r.high)


def _build(component: Component, inputs: list[TensorSpec], outputs: list[TensorSpec],
           ranges: Mapping[str, _Range], name: str) -> ExportSpec:
    profile = ShapeProfile(name, {t.name: _shape_triple(t.shape, ranges) for t in inputs})
    return ExportSpec(component, tuple(inputs), tuple(outputs), (profile,))


def _dit_spec(component: Component, model: nn.Module, task: TaskSpec,
              grids: list[tuple[int, int, int]], name: str, per_token_timesteps: bool) -> ExportSpec:
    cfg = task.dit
    _, patch_h, patch_w = cfg.patch_size
    patch_grids = [(f, h // patch_h, w // patch_w) for f, h, w in grids]
    ranges = {FRAMES_AXIS: _Range.of([g[0] for g in patch_grids]),
              "patch_rows": _Range.of([g[1] for g in patch_grids]),
              "patch_cols": _Range.of([g[2] for g in patch_grids])}
    # The token count is the product of the grid axes at each end of the profile, so the
    # min and max shapes of every input are one consistent run (DIT_POST takes both).
    ranges[TOKENS_AXIS] = _Range(*(math.prod(getattr(ranges[axis], end) for axis in ranges)
                                   for end in ("low", "opt", "high")))
    dtype = compute_dtype_of(model)
    f32 = torch.float32
    tokens = (BATCH, TOKENS_AXIS, cfg.dim)
    latent = (BATCH, FRAMES_AXIS, scaled_axis("patch_rows", patch_h), scaled_axis("patch_cols", patch_w))
    # One time embedding for all tokens, or one per token (the time axis is the token axis).
    time_axis = TOKENS_AXIS if per_token_timesteps else 1
    time_emb = TensorSpec("time_emb", (BATCH, time_axis, cfg.dim), f32)
    time_mod = TensorSpec("time_mod", (BATCH, time_axis, 6, cfg.dim), f32)
    if component is Component.DIT_PRE:
        sinusoid_dtype = model.time_embedding[0].weight.dtype  # what WanDiT.time_sinusoid gives
        inputs = [TensorSpec("x", (latent[0], cfg.out_dim, *latent[1:]), f32),
                  TensorSpec("time_sinusoid", (BATCH, time_axis, cfg.freq_dim), sinusoid_dtype),
                  TensorSpec("context", (BATCH, cfg.text_len, cfg.text_dim), f32)]
        if cfg.model_type is ModelType.I2V:
            inputs.append(TensorSpec("y", (latent[0], cfg.in_dim - cfg.out_dim, *latent[1:]), f32))
        outputs = [TensorSpec("tokens", tokens, f32), time_emb, time_mod,
                   TensorSpec("context_emb", (BATCH, cfg.text_len, cfg.dim), dtype)]
    elif component is Component.DIT_BLOCK:
        block = model.blocks[0] if isinstance(model, WanDiT) else model
        rope = (TOKENS_AXIS, 1, cfg.head_dim // 2)
        inputs = [TensorSpec("x", tokens, f32), time_mod,
                  TensorSpec("context_emb", (BATCH, cfg.text_len, cfg.dim), dtype),
                  TensorSpec("rope_cos", rope, f32), TensorSpec("rope_sin", rope, f32)]
        inputs += [TensorSpec(name, tuple(t.shape), t.dtype)
                   for name, t in block.state_dict(keep_vars=True).items()]
        outputs = [TensorSpec("x_out", tokens, f32)]
    else:
        inputs = [TensorSpec("tokens", tokens, f32), time_emb,
                  TensorSpec("grid", (FRAMES_AXIS, "patch_rows", "patch_cols"), f32)]
        outputs = [TensorSpec("prediction", (latent[0], cfg.out_dim, *latent[1:]), f32)]
    if component is Component.DIT_BLOCK:
        # A block sees token counts only: runs of different grids share its artifact.
        tokens_range = ranges[TOKENS_AXIS]
        name = f"tokens={tokens_range.low}..{tokens_range.high}"
    if per_token_timesteps:
        name += ";per-token timesteps"
    return _build(component, inputs, outputs, ranges, name)


def _meta_step(vae: WanVAE, decode: bool, x: Tensor, cache: list[Tensor] | None):
    """Run one VAE step on the meta device: shapes only, no memory, no compute."""
    state = {k: torch.empty_like(v, device="meta") for k, v in vae.state_dict().items()}
    step = WanVAE.decode_step if decode else WanVAE.encode_step
    # functional_call only reroutes `forward`; a named method needs the tensors swapped in.
    with stateless._reparametrize_module(vae, state):
        return step(vae, x, cache)


def _vae_step_shapes(vae: WanVAE, step: VAEStep, rows: int, cols: int):
    """(input, output, cache shapes) of the step at latent size rows x cols; the cache is
    what the step returns (a steady step also takes one of the same shapes)."""
    _, spatial, _ = vae.config.stride
    channels = vae.config.z_dim
    if step.decode:
        first = torch.empty(BATCH, channels, 1, rows, cols, device="meta")
        step_in = first
    else:
        first = torch.empty(BATCH, 3, 1, rows * spatial, cols * spatial, device="meta")
        step_in = torch.empty(BATCH, 3, FRAMES_PER_ENCODE_STEP, rows * spatial, cols * spatial, device="meta")
    out, cache = _meta_step(vae, step.decode, first, None)
    if step.first:
        return tuple(first.shape), tuple(out.shape), [tuple(c.shape) for c in cache]
    out, next_cache = _meta_step(vae, step.decode, step_in, cache)
    return tuple(step_in.shape), tuple(out.shape), [tuple(c.shape) for c in next_cache]


def _spatial_names(shape: tuple[int, ...], rows: int, cols: int) -> tuple[int | str, ...]:
    """Name the two trailing (spatial) axes of a 5-D VAE tensor as multiples of the latent size."""
    *lead, height, width = shape
    if height % rows or width % cols:
        raise AssertionError(f"VAE tensor {shape} is not a multiple of the latent {rows}x{cols}")
    return (*lead, scaled_axis("latent_rows", height // rows), scaled_axis("latent_cols", width // cols))


def _vae_spec(component: Component, vae: WanVAE, grids: list[tuple[int, int, int]], name: str) -> ExportSpec:
    step = VAE_STEPS[component]
    ranges = {"latent_rows": _Range.of([g[1] for g in grids]),
              "latent_cols": _Range.of([g[2] for g in grids])}
    # Shapes from a meta run at a probe size; the axis factors do not depend on the size.
    rows, cols = 2, 3
    step_in, out, cache = _vae_step_shapes(vae, step, rows, cols)
    f32 = torch.float32
    in_name, out_name = ("latent", "frames") if step.decode else ("frames", "latent")
    inputs = [TensorSpec(in_name, _spatial_names(step_in, rows, cols), f32)]
    if not step.first:
        inputs += [TensorSpec(f"cache_{i}", _spatial_names(s, rows, cols), f32) for i, s in enumerate(cache)]
    outputs = [TensorSpec(out_name, _spatial_names(out, rows, cols), f32)]
    outputs += [TensorSpec(f"next_cache_{i}", _spatial_names(s, rows, cols), f32) for i, s in enumerate(cache)]
    return _build(component, inputs, outputs, ranges, name)


def make_spec(component: Component, model: nn.Module, task: TaskSpec, sizes: Sequence[str],
              frame_nums: Sequence[int], per_token_timesteps: bool = False) -> ExportSpec:
    """Dynamic axes and one profile covering the token counts / latent sizes implied by the
    requested sizes and frame counts (min = smallest, opt = first requested, max = largest).

    `model` is what `export_module` takes for the component (WanDiT, DiTBlock or WanVAE).
    `per_token_timesteps` selects the DiT graphs' per-token variant (ti2v with an image).
    """
    component = Component(component)
    grids = latent_grids(task, list(sizes), list(frame_nums))
    name = _profile_name(sizes, frame_nums)
    if component in VAE_STEPS:
        if per_token_timesteps:
            raise ValueError(f"{component.value} has no timesteps")
        _expect(model, WanVAE, component)
        return _vae_spec(component, model, grids, name)
    return _dit_spec(component, model, task, grids, name, per_token_timesteps)
