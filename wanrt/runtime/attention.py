"""Attention backends for the DiT's self-attention, swapped in from outside the model.

`use_attention(model, backend)` sets each block's `self_attn.attention_kernel` (the model's
one hook point, exact SDPA by default) to a guarded 8-bit kernel, and `restore_sdpa(model)`
takes it back. Backends are a small registry:

* `sdpa`: the model's own `torch.nn.functional.scaled_dot_product_attention`.
* `sage`: wanrt's Triton kernel in the SageAttention style (`wanrt.kernels.sage_attention`):
  int8 Q/K per block with K smoothing, int8 QK^T, float32 online softmax, P·V in fp8 e4m3 on
  SM89+ and fp16 elsewhere. It needs a CUDA GPU, or TRITON_INTERPRET=1 (tests, on CPU).
* `auto`: `sage` on a CUDA GPU with Triton (SM80+), `sdpa` otherwise (always on the CPU).

The fidelity guard: 8-bit attention can blacken or noise a video on some layers. On its first
call each block computes both SDPA and the 8-bit kernel on the same inputs, returns SDPA's
output, and keeps the 8-bit kernel only if `||8bit - sdpa|| / ||sdpa||` is within the
threshold; the first and last blocks stay SDPA by default. A non-finite 8-bit output at any
later call is replaced by SDPA's and the block stays SDPA from then on: never a black video.
The decisions are in the model's `AttentionReport` (printed and recorded by `wanrt generate`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from wanrt.errors import ConfigError, parse_choice
from wanrt.kernels import PVPrecision, triton_available
from wanrt.models.dit import SelfAttention, attention

if TYPE_CHECKING:
    from wanrt.loading.checkpoint import Expert
    from wanrt.pipelines import Pipeline

# `(q, k, v, key_mask) -> out`, all `[B, L, N, D]`: what `SelfAttention.attention_kernel` is.
AttentionKernel = Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]

REPORT_ATTR = "attention_report"  # where `use_attention` leaves the report on the model


class AttentionBackend(str, Enum):
    SDPA = "sdpa"
    SAGE = "sage"
    AUTO = "auto"


def parse_attention_backend(value: AttentionBackend | str) -> AttentionBackend:
    return parse_choice(AttentionBackend, value, "--attention")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def sage_pv_precision(device: torch.device) -> PVPrecision:
    """fp8 e4m3 P·V where the GPU has fp8 tensor cores (SM89+), fp16 elsewhere (and on the
    CPU under the interpreter, whose float8 casts are wrong)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        return PVPrecision.FP8
    return PVPrecision.FP16


def _sage_kernel(device: torch.device) -> tuple[AttentionKernel, str]:
    if not triton_available():
        raise ConfigError("--attention sage needs Triton (pip install triton; it ships with torch on Linux)")
    if device.type != "cuda" and not _interpreting():
        raise ConfigError(f"--attention sage runs on a CUDA GPU, not {device.type}; use --attention sdpa "
                          "(or set TRITON_INTERPRET=1 to run the kernel slowly on the CPU for testing)")
    from wanrt.kernels.sage_attention import sage_attention

    pv = sage_pv_precision(device)
    return functools.partial(sage_attention, pv=pv), f"int8 QK, {pv.value} PV"


def _sdpa_kernel(device: torch.device) -> tuple[AttentionKernel, str]:
    return attention, "torch SDPA"


# Backend -> (device -> (kernel, description)).
BACKENDS: dict[AttentionBackend, Callable[[torch.device], tuple[AttentionKernel, str]]] = {
    AttentionBackend.SDPA: _sdpa_kernel,
    AttentionBackend.SAGE: _sage_kernel,
}


def pick_auto(device: torch.device) -> tuple[AttentionBackend, str]:
    """What `auto` runs on `device`, and why."""
    if device.type != "cuda":
        return AttentionBackend.SDPA, f"no 8-bit attention kernel on {device.type}"
    if not triton_available():
        return AttentionBackend.SDPA, "Triton is not installed"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        return AttentionBackend.SDPA, "the int8 kernel targets SM80 and newer"
    return AttentionBackend.SAGE, f"int8 tensor cores on SM{major}{minor}"


def resolve_backend(backend: AttentionBackend | str, device: torch.device) -> tuple[AttentionBackend, str]:
    """(the concrete backend, why) for what the user asked on `device`."""
    backend = parse_attention_backend(backend)
    if backend is AttentionBackend.AUTO:
        chosen, reason = pick_auto(device)
        return chosen, f"auto: {reason}"
    return backend, "requested"


def check_backend(backend: AttentionBackend | str, device: torch.device) -> AttentionBackend:
    """The concrete backend `backend` runs on `device`; a ConfigError naming the fix if it
    cannot run there (call it before expensive work)."""
    chosen, _ = resolve_backend(backend, device)
    BACKENDS[chosen](device)
    return chosen


@dataclass(frozen=True)
class AttentionGuard:
    """Which blocks keep SDPA. `threshold` is the relative L2 error of a block's 8-bit
    attention output against SDPA's on its first call; with int8 QK^T and fp16/fp8 P·V it is
    ~1-2e-2 on well-conditioned inputs (tests/test_attention.py), so 5e-2 keeps only blocks
    the kernel damages."""

    threshold: float = 0.05
    keep_first_blocks: int = 1
    keep_last_blocks: int = 1

    def __post_init__(self) -> None:
        if self.keep_first_blocks < 0 or self.keep_last_blocks < 0 or not self.threshold > 0:
            raise ConfigError("the attention guard needs keep_first_blocks, keep_last_blocks >= 0 and threshold > 0")


DEFAULT_GUARD = AttentionGuard()
GUARD_REASON = "guard"


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """||actual - expected|| / ||expected|| in float32 (NaN if actual is not finite)."""
    expected = expected.float()
    return ((actual.float() - expected).norm() / expected.norm().clamp_min(torch.finfo(torch.float32).tiny)).item()


@dataclass
class BlockDecision:
    """What one block's self-attention runs, its first-call error against SDPA, and why."""

    block: int
    eight_bit: bool | None  # None until the block's first call decides
    rel_error: float | None = None
    reason: str = ""


class GuardedAttention:
    """A block's attention kernel: the 8-bit kernel where its guard allows, else SDPA."""

    def __init__(self, kernel: AttentionKernel, decision: BlockDecision, threshold: float | None) -> None:
        self.kernel = kernel
        self.decision = decision
        self.threshold = threshold  # None: no first-call comparison, 8-bit from the start

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
        decision = self.decision
        if decision.eight_bit is False:
            return attention(q, k, v, key_mask)
        if decision.eight_bit is None:
            reference = attention(q, k, v, key_mask)
            error = relative_error(self.kernel(q, k, v, key_mask), reference)
            decision.rel_error = error
            # `not error <= threshold` also catches a NaN error.
            decision.eight_bit = error <= self.threshold
            decision.reason = ("within the guard's threshold" if decision.eight_bit else
                               f"{GUARD_REASON}: rel err {error:.2e} > threshold {self.threshold:.2e}")
            return reference
        out = self.kernel(q, k, v, key_mask)
        # One host sync per block call: microseconds against a block's tens of milliseconds.
        if not torch.isfinite(out).all():
            decision.eight_bit = False
            decision.reason = f"{GUARD_REASON}: non-finite 8-bit output; SDPA from then on"
            return attention(q, k, v, key_mask)
        return out


@dataclass(frozen=True)
class AttentionReport:
    """What a model's self-attention runs: the backend and each block's decision (live: the
    guard fills the decisions in on each block's first call)."""

    backend: AttentionBackend
    kernel: str                       # e.g. "int8 QK, fp8 PV"
    reason: str                       # why this backend (requested / what auto saw)
    guard: AttentionGuard | None
    blocks: tuple[BlockDecision, ...]

    @property
    def decided(self) -> bool:
        return all(block.eight_bit is not None for block in self.blocks)

    def summary(self) -> str:
        """One line, e.g. 'sage (int8 QK, fp8 PV; requested): 38/40 blocks 8-bit, 2 sdpa
        (0 guard, 2 policy), max rel err 1.3e-02'."""
        if self.backend is AttentionBackend.SDPA:
            return f"sdpa ({self.reason})"
        eight_bit = [block for block in self.blocks if block.eight_bit]
        kept = [block for block in self.blocks if block.eight_bit is False]
        by_guard = sum(block.reason.startswith(GUARD_REASON) for block in kept)
        errors = [block.rel_error for block in eight_bit if block.rel_error is not None]
        error = f", max rel err {max(errors):.1e}" if errors else ""
        pending = len(self.blocks) - len(eight_bit) - len(kept)
        waiting = f", {pending} undecided" if pending else ""
        return (f"{self.backend.value} ({self.kernel}; {self.reason}): {len(eight_bit)}/{len(self.blocks)} blocks "
                f"8-bit, {len(kept)} sdpa ({by_guard} guard, {len(kept) - by_guard} policy){waiting}{error}")

    def to_dict(self) -> dict[str, Any]:
        record = {"backend": self.backend.value, "kernel": self.kernel, "reason": self.reason,
                  "summary": self.summary()}
        if self.backend is AttentionBackend.SDPA:  # every block runs it: nothing more to say
            return record
        return {**record, "guard": dataclasses.asdict(self.guard) if self.guard else None,
                "blocks": [dataclasses.asdict(block) for block in self.blocks]}


def _self_attentions(model: nn.Module) -> list[SelfAttention]:
    blocks = getattr(model, getattr(model, "repeated_blocks", "blocks"))
    return [block.self_attn for block in blocks]


def use_attention(model: nn.Module, backend: AttentionBackend | str, device: torch.device | None = None,
                  guard: AttentionGuard | None = DEFAULT_GUARD) -> AttentionReport:
    """Run `model`'s self-attention through `backend` on `device` (default: the model's);
    the report is returned and left on the model as `model.attention_report`. `guard=None`
    runs every block 8-bit with no first-call comparison (NaN outputs still fall back)."""
    device = device or next(model.parameters()).device
    chosen, reason = resolve_backend(backend, device)
    kernel, description = BACKENDS[chosen](device)
    attentions = _self_attentions(model)
    restore_sdpa(model)
    if chosen is AttentionBackend.SDPA:
        decisions = tuple(BlockDecision(index, False, reason="sdpa backend") for index in range(len(attentions)))
    else:
        decisions = tuple(_first_decision(index, len(attentions), guard) for index in range(len(attentions)))
        for module, decision in zip(attentions, decisions):
            module.attention_kernel = GuardedAttention(kernel, decision, guard.threshold if guard else None)
    report = AttentionReport(chosen, description, reason, guard, decisions)
    setattr(model, REPORT_ATTR, report)
    return report


def _first_decision(index: int, count: int, guard: AttentionGuard | None) -> BlockDecision:
    if guard is None:
        return BlockDecision(index, True, reason="no guard")
    if index < guard.keep_first_blocks:
        return BlockDecision(index, False, reason=f"one of the first {guard.keep_first_blocks} block(s)")
    if index >= count - guard.keep_last_blocks:
        return BlockDecision(index, False, reason=f"one of the last {guard.keep_last_blocks} block(s)")
    return BlockDecision(index, None)


def restore_sdpa(model: nn.Module) -> nn.Module:
    """Back to the model's own SDPA in every block."""
    for module in _self_attentions(model):
        module.__dict__.pop("attention_kernel", None)
    if hasattr(model, REPORT_ATTR):
        delattr(model, REPORT_ATTR)
    return model


def attach_attention(pipeline: "Pipeline", backend: AttentionBackend | str,
                     guard: AttentionGuard | None = DEFAULT_GUARD,
                     on_decided: Callable[[str, AttentionReport], None] | None = None) -> dict[str, dict[str, Any]]:
    """Make every expert `pipeline` loads run its self-attention through `backend`, composed
    with whatever `pipeline.wrap_expert` already does (attach an engine first).

    Returns the run's record, expert name -> `AttentionReport.to_dict()`, kept current after
    each forward (for the sidecar). `on_decided(expert, report)` is called once per expert,
    after the forward in which its guard decided every block (the CLI prints the summary).
    An unusable backend raises here, before anything loads."""
    check_backend(backend, pipeline.device)
    record: dict[str, dict[str, Any]] = {}
    announced: set[str] = set()
    wrapped = pipeline.wrap_expert

    def wrap_expert(expert: "Expert", model: nn.Module) -> Callable[..., Tensor]:
        report = use_attention(model, backend, pipeline.device, guard)
        runner = model if wrapped is None else wrapped(expert, model)

        def run(*args: Any, **kwargs: Any) -> Tensor:
            out = runner(*args, **kwargs)
            record[expert.value] = report.to_dict()
            if report.decided and expert.value not in announced:
                announced.add(expert.value)
                if on_decided is not None:
                    on_decided(expert.value, report)
            return out
        return run

    pipeline.wrap_expert = wrap_expert
    return record
