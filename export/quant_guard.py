"""The fidelity guard: measure every candidate layer's quantization error on calibration
inputs, and keep in high precision each layer the scheme would damage.

Calibration runs a few ordinary forwards of the high-precision model. A forward pre-hook on
each Linear the policy would quantize keeps a capped, uniform random subset of the rows it
sees (priority sampling: every row draws a random key and the `rows_per_layer` largest keys
survive), so memory stays at layers x rows_per_layer x in_features whatever the token count.
Each layer is then measured alone in float32 with the deployed arithmetic (for W8A8 schemes
the activation quantization included, whatever kernel the calibration device would run):

    rel_error = ||Q(x) - L(x)|| / ||L(x)||

Layers above the threshold stay high precision, and the QuantReport says why.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from wanrt.errors import ConfigError
from wanrt.export.quantize import (
    DEFAULT_POLICY,
    GUARD_REASON,
    QUANT_ATTR,
    SCHEMES,
    LayerReport,
    PrecisionPolicy,
    QuantReport,
    Scheme,
    SchemeMethod,
    check_not_quantized,
    parse_scheme,
    plan_layers,
    quantize,
)
from wanrt.progress import track

__all__ = ["LayerReport", "QuantReport", "calibrate_and_guard", "layer_rel_error"]

DEFAULT_ROWS_PER_LAYER = 256


class RowSample:
    """Forward pre-hook keeping a uniform random subset of at most `cap` input rows."""

    def __init__(self, cap: int, generator: torch.Generator) -> None:
        self.cap = cap
        self.generator = generator
        self.rows: Tensor | None = None
        self.keys: Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        rows = args[0].detach().reshape(-1, args[0].shape[-1])
        # Keys come from one seeded CPU generator, so the subset is reproducible on any device.
        keys = torch.rand(rows.shape[0], generator=self.generator).to(rows.device)
        if self.rows is None:
            rows = rows.clone()  # never keep the model's activation itself alive
        else:
            rows, keys = torch.cat([self.rows, rows]), torch.cat([self.keys, keys])
        if rows.shape[0] > self.cap:
            survivors = keys.topk(self.cap).indices
            rows, keys = rows[survivors], keys[survivors]
        self.rows, self.keys = rows, keys


def layer_rel_error(method: SchemeMethod, linear: nn.Linear, rows: Tensor) -> float:
    """||Q(x) - L(x)|| / ||L(x)|| in float32 for the rows `x` of one layer."""
    reference = copy.deepcopy(linear).float().requires_grad_(False)
    x = rows.float()
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        expected = reference(x)
        actual = method.measure_linear(reference)(x)
    return ((actual - expected).norm() / expected.norm().clamp_min(torch.finfo(torch.float32).tiny)).item()


def calibrate_and_guard(model: nn.Module, calibration_inputs: Iterable[Mapping[str, Any]],
                        scheme: Scheme | str, policy: PrecisionPolicy = DEFAULT_POLICY,
                        threshold: float | None = None, *, rows_per_layer: int = DEFAULT_ROWS_PER_LAYER,
                        autocast_dtype: torch.dtype | None = None, seed: int = 0) -> QuantReport:
    """Calibrate, then quantize `model` in place keeping every layer over `threshold`.

    Each calibration input holds the keyword arguments of one `model(...)` call (for the
    DiT: x, timestep, context, y, seq_len). `autocast_dtype` runs them under autocast as
    generation would. `threshold` defaults to the scheme's. The returned report (also left
    on the model as `model.quant_report`) has every Linear's error, decision and reason.
    """
    scheme = parse_scheme(scheme)
    method = SCHEMES[scheme]
    if method is None:
        raise ConfigError(f"{scheme.value} is the unquantized scheme: there is nothing to guard")
    check_not_quantized(model)
    threshold = method.default_threshold if threshold is None else threshold
    candidates = {layer.name: model.get_submodule(layer.name)
                  for layer in plan_layers(model, scheme, policy) if layer.quantized}
    generator = torch.Generator().manual_seed(seed)
    samples = {name: RowSample(rows_per_layer, generator) for name in candidates}
    hooks = [linear.register_forward_pre_hook(samples[name]) for name, linear in candidates.items()]
    device_type = next(model.parameters()).device.type
    try:
        with torch.no_grad(), torch.autocast(device_type, dtype=autocast_dtype,
                                             enabled=autocast_dtype is not None):
            for inputs in track(calibration_inputs, "calibrating"):
                model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    unseen = sorted(name for name, sample in samples.items() if sample.rows is None)
    if unseen:
        raise ConfigError(f"the calibration inputs never reached {unseen}; "
                          "give inputs that run the whole model")

    errors = {name: layer_rel_error(method, linear, samples[name].rows) for name, linear in candidates.items()}
    # `not error <= threshold` also keeps a layer whose error is NaN.
    over = {name: f"{GUARD_REASON}: rel err {error:.2e} > threshold {threshold:.2e}"
            for name, error in errors.items() if not error <= threshold}
    quantize(model, scheme, policy, keep=over)
    planned = getattr(model, QUANT_ATTR)
    report = dataclasses.replace(planned, threshold=threshold, layers=tuple(
        dataclasses.replace(layer, rel_error=errors.get(layer.name)) for layer in planned.layers))
    setattr(model, QUANT_ATTR, report)
    return report
