"""The `eager` engine: the models' own PyTorch code, the reference every engine is tested against."""

from __future__ import annotations

from wanrt.engines.base import Engine, EngineKind


class EagerEngine(Engine):
    kind = EngineKind.EAGER
