"""The `aoti` engine: AOTInductor `.pt2` packages (export/aoti.py) for the DiT pre, block and
post graphs and the VAE's causal steps, verified against their manifests before loading."""

from __future__ import annotations

from pathlib import Path

from wanrt.engines.artifacts import ArtifactEngine, ArtifactRunner
from wanrt.engines.base import EngineKind
from wanrt.export.aoti import load_package
from wanrt.export.build import Backend
from wanrt.export.manifest import Manifest
from wanrt.export.specs import ExportSpec


class AOTIEngine(ArtifactEngine):
    kind = EngineKind.AOTI
    backend = Backend.AOTI

    def load(self, directory: Path, manifest: Manifest, spec: ExportSpec) -> ArtifactRunner:
        return load_package(directory, self.options.device)
