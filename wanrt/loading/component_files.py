"""Single files given for some components (`--dit`, `--dit-high`, `--dit-low`, `--vae`, `--t5`)
in place of a checkpoint folder's own; the folder (`--ckpt-dir`) supplies the rest.

Everything here reads headers only: a DiT file of another variant, an unknown format or a
truncated file is refused before any weight loads, and the precision the stored weights
run at is known before the memory planner runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from wanrt.configs import TaskSpec
from wanrt.errors import InputError, parse_choice
from wanrt.export.quantize import resolve_precision
from wanrt.loading.checkpoint import CheckpointFiles, Expert
from wanrt.loading.single_file import dit_file_config, file_format, open_dit_file
from wanrt.loading.stored_linears import SCHEMES
from wanrt.runtime.planner import Precision, PrecisionChoice


@dataclass(frozen=True)
class ComponentFiles:
    """Files that replace components of the checkpoint folder; None keeps the folder's."""

    dit: Path | None = None        # the one DiT of a single-expert task (ti2v-5B)
    dit_high: Path | None = None   # the high-noise expert of an A14B task
    dit_low: Path | None = None    # the low-noise expert
    vae: Path | None = None
    t5: Path | None = None

    @property
    def given(self) -> dict[str, Path]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                if getattr(self, field.name) is not None}


_FLAGS = {"dit": "--dit", "dit_high": "--dit-high", "dit_low": "--dit-low", "vae": "--vae", "t5": "--t5"}


def apply_component_files(files: CheckpointFiles, task: TaskSpec, components: ComponentFiles | None
                          ) -> CheckpointFiles:
    """`files` with the given components replaced, each DiT file's architecture checked
    against the task from its header."""
    if components is None or not components.given:
        return files
    for name, path in components.given.items():
        if not Path(path).is_file():
            raise InputError(f"{_FLAGS[name]} {path}: file not found")
    if task.is_moe and components.dit is not None:
        raise InputError(f"--dit: {task.name} has two experts; give --dit-high and --dit-low")
    if not task.is_moe and (components.dit_high or components.dit_low):
        raise InputError(f"--dit-high/--dit-low: {task.name} has one DiT; give --dit")
    experts = {Expert.ONLY: components.dit, Expert.HIGH_NOISE: components.dit_high,
               Expert.LOW_NOISE: components.dit_low}
    dit_dirs = dict(files.dit_dirs)
    for expert, path in experts.items():
        if path is not None:
            dit_file_config(open_dit_file(Path(path)), task.dit)
            dit_dirs[expert] = Path(path)
    return dataclasses.replace(files, dit_dirs=dit_dirs, vae=Path(components.vae or files.vae),
                               t5=Path(components.t5 or files.t5))


def stored_precision(files: CheckpointFiles | None, requested: PrecisionChoice | str, arch: str = "cpu") -> Precision:
    """The precision the DiT weights will run at on `arch` ("sm_90", "cpu"): `requested`
    (bf16, fp8/int8 quantized at load, or auto: `resolve_precision`), unless the DiT files
    already store 8-bit Linears, which run as stored."""
    requested = parse_choice(PrecisionChoice, requested, "--precision")
    stored = set()
    for path in files.dit_dirs.values() if files is not None else ():
        kinds = set(open_dit_file(Path(path)).quantized.values()) if Path(path).is_file() else set()
        stored |= {Precision(SCHEMES[kind].value) for kind in kinds} or {Precision.BF16}
    quantized = stored - {Precision.BF16}
    if not quantized:
        return resolve_precision(requested, arch)
    named = requested not in (PrecisionChoice.BF16, PrecisionChoice.AUTO)
    if named and quantized != {Precision(requested.value)}:
        raise InputError(f"--precision {requested.value}: the DiT files already hold "
                         f"{'/'.join(sorted(p.value for p in quantized))} weights, which run as stored; "
                         "leave --precision out")
    # A high-precision expert beside an 8-bit one: plan for the larger bf16 bytes.
    return Precision.BF16 if Precision.BF16 in stored else quantized.pop()


def component_formats(files: CheckpointFiles) -> dict[Path, str]:
    """Path -> format of every weight component (sidecar): a single file's decoded format,
    the folder layout for a checkpoint folder, `pth` for the official .pth files."""
    return {Path(path): file_format(Path(path)).value if Path(path).is_file() else files.layout.value
            for path in (*files.dit_dirs.values(), files.vae, files.t5)}
