"""Post-training quantization of the DiT's Linear layers: transforms applied from outside.

`quantize(model, scheme, policy)` swaps `nn.Linear` modules for quantized ones in place
(gpt-fast `quantize.py` style); the model code is never touched. Schemes:

* `fp8`: float8 e4m3 weights with per-output-channel float32 scales (amax/448). Where the
  device has fp8 tensor cores it runs W8A8: dynamic per-token e4m3 activations and
  `torch._scaled_mm` with rowwise scales; elsewhere the same stored weights are
  dequantized on the fly.
* `int8`: int8 weights, per-channel scales (amax/127), W8A8 with dynamic per-token int8
  activations through `torch._int_mm`; weight-only dequant where `_int_mm` cannot run.
* `int8-wo`, `int4-wo`: weight-only through optimum-quanto (the optional `quant` extra).
* `bf16`: the no-op scheme (the model keeps its own precision).

The kernel a quantized module runs is chosen once per device (a cached probe), never per
call with a host sync; it can be pinned per module through `module.kernel`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wanrt.errors import ConfigError, InputError, parse_choice
from wanrt.kernels import triton_available
from wanrt.runtime.planner import Precision, PrecisionChoice, short_dtype_name

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
INT8_MAX = 127
# An all-zero row (the padding tokens past the video, a dead output channel) gets this
# floor instead of a zero scale, so it quantizes to zeros instead of 0/0.
AMAX_FLOOR = 1e-12
# torch._int_mm on CUDA needs more than 16 rows; smaller inputs are zero-padded to this.
INT_MM_MIN_ROWS = 17

QUANT_ATTR = "quant_report"  # where `quantize` leaves the QuantReport on the model


class Scheme(str, Enum):
    BF16 = "bf16"
    FP8 = "fp8"
    INT8 = "int8"
    INT8_WO = "int8-wo"
    INT4_WO = "int4-wo"


def parse_scheme(scheme: Scheme | str) -> Scheme:
    return parse_choice(Scheme, scheme, "quantization scheme", error=ConfigError)


class Kernel(str, Enum):
    DEQUANT = "dequant"      # weight-only: dequantize, then a matmul in the compute dtype
    SCALED_MM = "scaled_mm"  # fp8 W8A8: torch._scaled_mm, rowwise scales
    INT_MM = "int_mm"        # int8 W8A8: torch._int_mm, int32 accumulation
    EMULATED = "emulated"    # the W8A8 arithmetic in float32: the guard's and the tests' reference


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype an nn.Linear would compute in: the autocast dtype if on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def quantize_rows(t: Tensor, qmax: float, qdtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Symmetric per-row quantization of a 2-D tensor: (values, float32 scales `[rows, 1]`).

    Integer targets round to nearest; float8 rounds in the cast. The clamp keeps a value
    that rounds past qmax finite (an out-of-range float8 cast may give NaN). One float32
    temporary of the input's size: this runs on every activation of a W8A8 layer.
    """
    amax = torch.linalg.vector_norm(t, ord=float("inf"), dim=-1, keepdim=True).float()
    scale = amax.clamp_min(AMAX_FLOOR) / qmax
    scaled = t / scale  # float32, whatever t's dtype (type promotion with the float32 scale)
    if not qdtype.is_floating_point:
        scaled.round_()
    return scaled.clamp_(-qmax, qmax).to(qdtype), scale


def quantize_activations(t: Tensor, qmax: float, qdtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """`quantize_rows` for a W8A8 GEMM's activations: on a GPU the fused Triton kernel
    (`wanrt.kernels.row_quant`, one read-quantize-write pass instead of five torch ops; the
    same values), elsewhere torch."""
    if t.is_cuda and t.stride(-1) == 1 and triton_available():
        from wanrt.kernels.row_quant import fused_quantize_rows

        return fused_quantize_rows(t, qmax, qdtype)
    return quantize_rows(t, qmax, qdtype)


def auto_scheme(capability: tuple[int, int] | None) -> Scheme:
    """The weight precision `auto` gives a GPU of compute `capability` (None: no GPU).

    SM90+ (H100/H200, Blackwell): fp8, whose rowwise `_scaled_mm` runs at ~1.5x bf16 on the
    H100 (benchmarks/results/quant_h100.json). SM89 (RTX 40, L40): int8, whose tensor cores
    run at twice fp8's rate with fp32 accumulation (660 vs 330 TOPS on an RTX 4090; not
    measured by wanrt). SM80-86 (Ampere): int8, the only 8-bit tensor-core format there.
    Older GPUs and the CPU: bf16."""
    if capability is None or capability < (8, 0):
        return Scheme.BF16
    if capability >= (9, 0):
        return Scheme.FP8
    return Scheme.INT8


def arch_capability(arch: str) -> tuple[int, int] | None:
    """"sm_89" -> (8, 9), "sm_100" -> (10, 0), "cpu" -> None: an architecture as
    `wanrt.export.manifest.device_arch` and `--arch` spell it, as a compute capability."""
    if arch == "cpu":
        return None
    digits = arch.removeprefix("sm_")
    if not (arch.startswith("sm_") and digits.isdigit() and len(digits) >= 2):
        raise InputError(f"--arch {arch!r} is not a GPU architecture; use sm_ and the compute capability's "
                         "digits, e.g. sm_89 (RTX 40, L40) or sm_90 (H100)")
    return int(digits[:-1]), int(digits[-1])


def resolve_precision(requested: PrecisionChoice | str, arch: str | None) -> Precision:
    """The precision a run on `arch` ("sm_90", "cpu"; None: not known) uses for `--precision
    requested`: a named one as is, auto per `auto_scheme` (bf16 on the CPU)."""
    requested = parse_choice(PrecisionChoice, requested, "--precision")
    if requested is not PrecisionChoice.AUTO:
        return Precision(requested.value)
    if arch is None:
        raise InputError("--precision auto picks by GPU architecture and there is no GPU here; "
                         "give --arch (e.g. sm_89, sm_90) or name a precision")
    return Precision(auto_scheme(arch_capability(arch)).value)


class QuantizedLinear(nn.Module):
    """A Linear with a quantized `[out, in]` weight and float32 per-output-channel scales.

    Subclasses fix the storage format and their W8A8 kernel. The state dict holds `weight`
    (the quantized values), `weight_scale` and `bias`, so the layout is the same on every
    device; only the kernel differs.
    """

    storage_dtype: torch.dtype
    qmax: float
    w8a8_kernel: Kernel
    # torch's W8A8 GEMMs need the inner and outer dims to be multiples of this.
    alignment: int

    def __init__(self, weight: Tensor, weight_scale: Tensor, bias: Tensor | None,
                 kernel: Kernel | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.kernel = kernel
        self.aligned = self.in_features % self.alignment == 0 and self.out_features % self.alignment == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: Kernel | None = None) -> QuantizedLinear:
        with torch.no_grad():
            weight, scale = quantize_rows(linear.weight, cls.qmax, cls.storage_dtype)
            bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls(weight, scale.flatten(), bias, kernel)

    def kernel_for(self, device: torch.device) -> Kernel:
        """The pinned kernel, else W8A8 where the device runs it and the shape allows."""
        if self.kernel is not None:
            return self.kernel
        if self.aligned and w8a8_available(self.w8a8_kernel, device):
            return self.w8a8_kernel
        return Kernel.DEQUANT

    def dequantized_weight(self) -> Tensor:
        """float32 `[out, in]`: exactly the values the quantized weight stands for."""
        return self.weight.float() * self.weight_scale[:, None]

    def store_dense(self, weight: Tensor) -> None:
        """Replace the stored values by `weight` (float `[out, in]`, e.g. a LoRA merged into
        `dequantized_weight()`), quantized in this layer's own format."""
        with torch.no_grad():
            values, scale = quantize_rows(weight.float(), self.qmax, self.storage_dtype)
        self.weight = values.to(self.weight.device)
        self.weight_scale = scale.flatten().to(self.weight_scale.device)

    def forward(self, x: Tensor) -> Tensor:
        dtype = compute_dtype(x)
        rows = x.reshape(-1, self.in_features)
        # Every kernel picks its own dtypes; autocast must not recast inside them.
        with torch.autocast(x.device.type, enabled=False):
            out = KERNELS[self.kernel_for(x.device)](self, rows, dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() / .bfloat16() would convert the quantized values and
        # the float32 scales too (float8 counts as floating point): they may move between
        # devices, but their dtypes are the stored format and stay.
        stored = {name: self._buffers[name] for name in ("weight", "weight_scale")}
        super()._apply(fn, recurse)
        for name, before in stored.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, kernel={self.kernel.value if self.kernel else 'auto'}")


def pin_kernel(model: nn.Module, kernel: Kernel | None) -> nn.Module:
    """Pin every quantized Linear of `model` to `kernel` (None: back to the device's choice)."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.kernel = kernel
    return model


class Float8Linear(QuantizedLinear):
    """fp8 e4m3 weights, per-output-channel float32 scales (amax/448)."""

    storage_dtype = FP8_DTYPE
    qmax = FP8_MAX
    w8a8_kernel = Kernel.SCALED_MM
    alignment = 16


class Int8Linear(QuantizedLinear):
    """Symmetric int8 weights, per-output-channel float32 scales (amax/127)."""

    storage_dtype = torch.int8
    qmax = INT8_MAX
    w8a8_kernel = Kernel.INT_MM
    alignment = 8


def _bias_as(module: QuantizedLinear, dtype: torch.dtype) -> Tensor | None:
    return module.bias.to(dtype) if module.bias is not None else None


def _dequant_kernel(module: QuantizedLinear, x: Tensor, dtype: torch.dtype) -> Tensor:
    # Dequantize in float32 and round once to the compute dtype: the weight then carries
    # the rounding of a plain bf16 checkpoint, no more.
    weight = module.dequantized_weight().to(dtype)
    return F.linear(x.to(dtype), weight, _bias_as(module, dtype))


def _emulated_kernel(module: QuantizedLinear, x: Tensor, dtype: torch.dtype) -> Tensor:
    values, scale = quantize_rows(x, module.qmax, module.storage_dtype)
    out = F.linear(values.float() * scale, module.dequantized_weight(), _bias_as(module, torch.float32))
    return out.to(dtype)


def _scaled_mm_kernel(module: QuantizedLinear, x: Tensor, dtype: torch.dtype) -> Tensor:
    values, scale = quantize_activations(x, FP8_MAX, FP8_DTYPE)
    # Rowwise _scaled_mm writes bf16/fp16 with a fused bias of that dtype; a float32 result
    # cannot fuse the bias (CUDA refuses it), so it is added afterwards.
    out_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32
    fused_bias = _bias_as(module, out_dtype) if out_dtype is not torch.float32 else None
    out = torch._scaled_mm(values, module.weight.t(), scale_a=scale,
                           scale_b=module.weight_scale[None, :], bias=fused_bias, out_dtype=out_dtype)
    if module.bias is not None and fused_bias is None:
        out = out + module.bias.float()
    return out.to(dtype)


def _int_mm_kernel(module: QuantizedLinear, x: Tensor, dtype: torch.dtype) -> Tensor:
    values, scale = quantize_activations(x, INT8_MAX, torch.int8)
    rows = values.shape[0]
    if rows < INT_MM_MIN_ROWS:
        values = F.pad(values, (0, 0, 0, INT_MM_MIN_ROWS - rows))
    # int32 accumulation is exact: |sum| <= K * 127^2 < 2^31 for K up to 133k.
    accumulated = torch._int_mm(values, module.weight.t())[:rows]
    out = accumulated.float().mul_(scale).mul_(module.weight_scale)
    if module.bias is not None:
        out = out.add_(module.bias.float())
    return out.to(dtype)


KERNELS: dict[Kernel, Callable[[QuantizedLinear, Tensor, torch.dtype], Tensor]] = {
    Kernel.DEQUANT: _dequant_kernel,
    Kernel.EMULATED: _emulated_kernel,
    Kernel.SCALED_MM: _scaled_mm_kernel,
    Kernel.INT_MM: _int_mm_kernel,
}


def _probe_scaled_mm(device: torch.device) -> None:
    a = torch.zeros(32, 32, dtype=FP8_DTYPE, device=device)
    b = torch.zeros(32, 32, dtype=FP8_DTYPE, device=device)
    torch._scaled_mm(a, b.t(), scale_a=torch.ones(32, 1, device=device),
                     scale_b=torch.ones(1, 32, device=device),
                     bias=torch.zeros(32, dtype=torch.bfloat16, device=device), out_dtype=torch.bfloat16)


def _probe_int_mm(device: torch.device) -> None:
    a = torch.zeros(INT_MM_MIN_ROWS, 32, dtype=torch.int8, device=device)
    torch._int_mm(a, torch.zeros(32, 32, dtype=torch.int8, device=device).t())


_PROBES = {Kernel.SCALED_MM: _probe_scaled_mm, Kernel.INT_MM: _probe_int_mm}


@functools.cache
def w8a8_available(kernel: Kernel, device: torch.device) -> bool:
    """Whether `kernel` is the one to run on `device`; probed once per process and device.

    CPU: torch's `_int_mm` is a real int8 GEMM (faster than float32 there), while its
    `_scaled_mm` emulates fp8 and is slower than dequantizing, so fp8 dequantizes on CPU.
    CUDA: fp8 needs compute capability 8.9+. Rowwise scales run on sm90 (cuBLAS/CUTLASS)
    and, in the torch versions wanrt supports, on sm89 through CUTLASS; a build without
    that kernel fails the probe and dequantizes instead. A per-tensor activation scale
    would run on every fp8 GPU but lets one outlier token flatten all others, so it is
    not used. int8 needs an `_int_mm` that accepts the probe (Ampere and newer).
    """
    if device.type == "cpu":
        return kernel is Kernel.INT_MM
    if device.type != "cuda":
        return False
    if kernel is Kernel.SCALED_MM and torch.cuda.get_device_capability(device) < (8, 9):
        return False
    try:
        _PROBES[kernel](device)
    except (RuntimeError, ValueError):  # TORCH_CHECK / TORCH_CHECK_VALUE / not implemented
        return False
    return True


def quantize_text_encoder(model: nn.Module, threshold: float = 6.0) -> nn.Module:
    """umt5 in 8 bits: every Linear becomes bitsandbytes' `Linear8bitLt` (LLM.int8, with
    fp16 outlier columns above `threshold`). Needs the optional `bitsandbytes`; the weights
    are quantized on the device they are on (bitsandbytes quantizes when moved there)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError("8-bit T5 needs bitsandbytes: pip install 'wanrt[quant]'") from None
    for name, linear in _linears(model):
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=threshold)
        layer.weight = bnb.nn.Int8Params(linear.weight.detach().clone(), requires_grad=False,
                                         has_fp16_weights=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        model.set_submodule(name, layer.to(linear.weight.device))
    return model


@functools.cache
def _quanto_linear_class() -> type:
    try:
        from optimum.quanto.nn import QLinear
    except ImportError:
        raise ConfigError("schemes int8-wo and int4-wo need optimum-quanto: pip install 'wanrt[quant]'") from None

    class QuantoLinear(QLinear):
        """quanto's QLinear fed in its weights' dtype. The DiT hands its Linears float32
        activations and relies on autocast to cast them; quanto's int4 matmul refuses a
        dtype mismatch instead, so the input is cast here (quanto computes in the weights'
        dtype, autocast or not)."""

        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x.to(self.weight.dtype))

    return QuantoLinear


def quanto_linear(weights: str, linear: nn.Linear) -> nn.Module:
    """Weight-only quanto layer (`weights` is a quanto qtype name: qint8, qint4), frozen."""
    module = _quanto_linear_class().from_module(linear, weights=weights)
    module.freeze()
    return module


@dataclass(frozen=True)
class SchemeMethod:
    """How a scheme quantizes one Linear, and how the guard measures it.

    `measure_linear` builds, from a float32 copy of the layer, a module whose float32
    forward has the deployed arithmetic (for W8A8 schemes: activation quantization
    included, whatever the kernel of the calibration device).
    """

    quantize_linear: Callable[[nn.Linear], nn.Module]
    measure_linear: Callable[[nn.Linear], nn.Module]
    # Per-layer relative error above which the guard keeps a layer in high precision: two to
    # three times what the scheme gives on well-conditioned (Gaussian) layers.
    default_threshold: float


SCHEMES: dict[Scheme, SchemeMethod | None] = {
    Scheme.BF16: None,
    Scheme.FP8: SchemeMethod(Float8Linear.from_linear,
                             functools.partial(Float8Linear.from_linear, kernel=Kernel.EMULATED), 0.08),
    Scheme.INT8: SchemeMethod(Int8Linear.from_linear,
                              functools.partial(Int8Linear.from_linear, kernel=Kernel.EMULATED), 0.025),
    Scheme.INT8_WO: SchemeMethod(functools.partial(quanto_linear, "qint8"),
                                 functools.partial(quanto_linear, "qint8"), 0.01),
    Scheme.INT4_WO: SchemeMethod(functools.partial(quanto_linear, "qint4"),
                                 functools.partial(quanto_linear, "qint4"), 0.15),
}


@dataclass(frozen=True)
class PrecisionPolicy:
    """Which Linear layers stay in high precision.

    Only the Linears inside the model's repeated blocks (its `repeated_blocks` hint) are
    quantized by default: the text/time embeddings, the time projection and the head stay
    (the patch embedding is a Conv3d; modulation tables and norms are not Linear). Of the
    blocks, the first `keep_first_blocks` and the last `keep_last_blocks` stay too, as
    published FP8 Wan checkpoints keep block 0 and the last block. Name patterns (fnmatch
    on the module name, e.g. "blocks.*.cross_attn.k") override the defaults: `keep` wins
    over `quantize`. Modules the model keeps in float32 (`keep_in_fp32`) are never quantized.
    """

    keep_first_blocks: int = 1
    keep_last_blocks: int = 1
    keep: tuple[str, ...] = ()
    quantize: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep", tuple(self.keep))
        object.__setattr__(self, "quantize", tuple(self.quantize))
        if self.keep_first_blocks < 0 or self.keep_last_blocks < 0:
            raise ConfigError("keep_first_blocks and keep_last_blocks must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "keep": list(self.keep), "quantize": list(self.quantize)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> PrecisionPolicy:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"unknown precision policy keys {unknown}")
        return cls(**raw)

    def decide(self, name: str, blocks: tuple[str, int] | None, keep_in_fp32: tuple[str, ...]
               ) -> tuple[bool, str]:
        """(quantize?, why) for the Linear `name`; `blocks` is (prefix, count) of the
        repeated blocks, None when the model declares none (then every Linear is a candidate)."""
        if any(part in keep_in_fp32 for part in name.split(".")):
            return False, "the model keeps it in float32 (keep_in_fp32)"
        for pattern in self.keep:
            if fnmatch.fnmatchcase(name, pattern):
                return False, f"policy keep pattern {pattern!r}"
        for pattern in self.quantize:
            if fnmatch.fnmatchcase(name, pattern):
                return True, f"policy quantize pattern {pattern!r}"
        if blocks is None:
            return True, "policy default"
        prefix, count = blocks
        if not name.startswith(prefix + "."):
            return False, "outside the repeated blocks (embedding, time projection or head)"
        index = int(name[len(prefix) + 1:].split(".")[0])
        if index < self.keep_first_blocks:
            return False, f"one of the first {self.keep_first_blocks} block(s)"
        if index >= count - self.keep_last_blocks:
            return False, f"one of the last {self.keep_last_blocks} block(s)"
        return True, "policy default"


DEFAULT_POLICY = PrecisionPolicy()


@dataclass(frozen=True)
class LayerReport:
    """One Linear of the model: the scheme it runs in, its measured error, and why."""

    name: str
    scheme: str            # the quantization scheme, or "bf16" for a layer kept in high precision
    rel_error: float | None  # ||Q(x) - L(x)|| / ||L(x)|| on calibration rows; None if not measured
    quantized: bool
    reason: str


GUARD_REASON = "guard"  # reasons of layers the fidelity guard kept start with this


@dataclass(frozen=True)
class QuantReport:
    """What was quantized and why; saved next to quantized weights as JSON."""

    scheme: Scheme
    policy: PrecisionPolicy
    threshold: float | None  # the guard's threshold; None when no guard ran
    layers: tuple[LayerReport, ...]
    # The dtype the kept layers compute in (the model's own: bf16 on GPUs, float32 on CPUs).
    kept_dtype: str = "bfloat16"

    @property
    def quantized_names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers if layer.quantized)

    def summary(self) -> str:
        """One line for generate time, e.g. 'fp8: 396/406 linears quantized, 10 kept bf16
        (4 guard, 6 policy), max rel err 2.1e-02'."""
        kept = [layer for layer in self.layers if not layer.quantized]
        by_guard = sum(layer.reason.startswith(GUARD_REASON) for layer in kept)
        errors = [layer.rel_error for layer in self.layers if layer.quantized and layer.rel_error is not None]
        error = f"max rel err {max(errors):.1e}" if errors else "rel err not measured"
        return (f"{self.scheme.value}: {len(self.layers) - len(kept)}/{len(self.layers)} linears quantized, "
                f"{len(kept)} kept {short_dtype_name(self.kept_dtype)} ({by_guard} guard, "
                f"{len(kept) - by_guard} policy), {error}")

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme.value, "policy": self.policy.to_dict(), "threshold": self.threshold,
                "layers": [dataclasses.asdict(layer) for layer in self.layers], "kept_dtype": self.kept_dtype}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> QuantReport:
        try:
            # Reports written before `kept_dtype` was recorded come from bf16 models.
            return cls(parse_scheme(raw["scheme"]), PrecisionPolicy.from_dict(raw["policy"]),
                       raw["threshold"], tuple(LayerReport(**layer) for layer in raw["layers"]),
                       raw.get("kept_dtype", "bfloat16"))
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"malformed quantization report ({type(exc).__name__}: {exc})") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> QuantReport:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"quantization report is not valid JSON ({exc})") from None


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, module) for name, module in model.named_modules() if type(module) is nn.Linear]


def plan_layers(model: nn.Module, scheme: Scheme | str, policy: PrecisionPolicy,
                keep: Mapping[str, str] | None = None) -> tuple[LayerReport, ...]:
    """One decision per nn.Linear of `model`; `keep` adds layers to keep, name -> reason."""
    scheme = parse_scheme(scheme)
    linears = [name for name, _ in _linears(model)]
    unknown = sorted(set(keep or {}) - set(linears))
    if unknown:
        raise ConfigError(f"cannot keep {unknown}: no such Linear in {type(model).__name__}")
    for pattern in policy.keep + policy.quantize:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in linears):
            raise ConfigError(f"precision policy pattern {pattern!r} matches no Linear of {type(model).__name__}")
    prefix = getattr(model, "repeated_blocks", None)
    blocks = (prefix, len(getattr(model, prefix))) if prefix else None
    keep_in_fp32 = tuple(getattr(model, "keep_in_fp32", ()))
    layers = []
    for name in linears:
        quantized, reason = policy.decide(name, blocks, keep_in_fp32)
        if quantized and keep and name in keep:
            quantized, reason = False, keep[name]
        layers.append(LayerReport(name, scheme.value if quantized else Scheme.BF16.value, None, quantized, reason))
    return tuple(layers)


def quantize_layers(model: nn.Module, scheme: Scheme | str, names: tuple[str, ...]) -> nn.Module:
    """Swap the named Linears for `scheme`'s quantized modules (works on `meta` too)."""
    method = SCHEMES[parse_scheme(scheme)]
    if method is None:
        return model
    for name in names:
        model.set_submodule(name, method.quantize_linear(model.get_submodule(name)))
    return model


def check_not_quantized(model: nn.Module) -> None:
    previous = getattr(model, QUANT_ATTR, None)
    if previous is not None:
        raise ConfigError(f"the model is already quantized ({previous.scheme.value}); "
                          "quantize the high-precision model instead")


def quantize(model: nn.Module, scheme: Scheme | str, policy: PrecisionPolicy = DEFAULT_POLICY,
             keep: Mapping[str, str] | None = None) -> nn.Module:
    """Quantize `model` in place and return it; its QuantReport is left as `model.quant_report`.

    `bf16` is the no-op scheme: the model is returned untouched.
    """
    scheme = parse_scheme(scheme)
    if SCHEMES[scheme] is None:
        return model
    check_not_quantized(model)
    layers = plan_layers(model, scheme, policy, keep)
    quantize_layers(model, scheme, tuple(layer.name for layer in layers if layer.quantized))
    kept_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    setattr(model, QUANT_ATTR, QuantReport(scheme, policy, None, layers, kept_dtype))
    return model
