"""Benchmark scenarios: what one measured run is, from flags or from a scenario file.

A scenario file is JSON or TOML with an optional `defaults` table applied to every entry
and a `scenarios` list; keys are the `Scenario` field names, unknown keys are refused:

    {"defaults": {"weights": "random", "steps": 4},
     "scenarios": [{"name": "a14b-480p-24g", "task": "t2v-A14B", "size": "832*480", "vram_gib": 24},
                   {"name": "5b-720p", "task": "ti2v-5B", "size": "1280*704"}]}

A relative `ckpt_dir` in a file is relative to the file's folder.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Mapping

import torch

from wanrt.configs import ModelType, TaskSpec, get_task
from wanrt.errors import InputError, WanrtError
from wanrt.pipelines import GenerationRequest
from wanrt.runtime.planner import Precision

DEFAULT_PROMPT = "a red car driving down a city street at night"


class Weights(str, Enum):
    RANDOM = "random"          # full-size (or tiny) random weights: timings only, never quality
    CHECKPOINT = "checkpoint"  # a real checkpoint folder


class Baseline(str, Enum):
    OFFICIAL = "official"    # wanrt with the official code's strategy: whole experts, bf16
    DIFFUSERS = "diffusers"  # diffusers' WanPipeline with its own offload


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """One measured configuration. Unset size/frames/steps take the task's defaults, an
    unset name is made from the settings."""

    name: str = ""
    task: str
    size: str | None = None
    frames: int | None = None
    steps: int | None = None
    precision: Precision = Precision.BF16
    # What runs the DiT (and the VAE steps): a `wanrt.engines` kind (eager, compile, aoti,
    # tensorrt, auto); the baselines always run eagerly.
    engine: str = "eager"
    # GPU memory cap (set with torch.cuda.set_per_process_memory_fraction) and the budget
    # the planner plans within; None = the whole device.
    vram_gib: float | None = None
    ram_gib: float | None = None
    # Overrides the planner: keep this many blocks resident and stream the rest.
    resident_blocks: int | None = None
    weights: Weights = Weights.RANDOM
    ckpt_dir: Path | None = None
    baselines: tuple[Baseline, ...] = (Baseline.OFFICIAL, Baseline.DIFFUSERS)
    seed: int = 0
    prompt: str = DEFAULT_PROMPT

    def __post_init__(self) -> None:
        try:
            self._validate()
        except WanrtError as error:
            raise InputError(f"scenario {self.name or self.task!r}: {error}") from None

    def _validate(self) -> None:
        from wanrt.engines.base import parse_engine_kind

        spec = get_task(self.task)
        for name, kind in (("precision", Precision), ("weights", Weights)):
            object.__setattr__(self, name, _choice(kind, getattr(self, name), name))
        object.__setattr__(self, "engine", parse_engine_kind(self.engine))
        object.__setattr__(self, "baselines", parse_baselines(self.baselines))
        # The same validation as `wanrt generate` (sizes of the task, 4n+1 frames); an i2v
        # scenario runs with a seeded random image, which a placeholder stands for here.
        placeholder = torch.zeros(3, 16, 16) if spec.dit.model_type is ModelType.I2V else None
        resolved = GenerationRequest(prompt=self.prompt, size=self.size, frame_num=self.frames,
                                     steps=self.steps, image=placeholder).resolved(spec)
        object.__setattr__(self, "size", resolved.size)
        object.__setattr__(self, "frames", resolved.frame_num)
        object.__setattr__(self, "steps", resolved.steps)
        if not self.name:
            parts = [self.task, self.size.replace("*", "x"), f"{self.frames}f", f"{self.steps}steps",
                     self.precision.value, f"{self.vram_gib:g}GiB" if self.vram_gib else ""]
            object.__setattr__(self, "name", "-".join(part for part in parts if part))
        for name in ("vram_gib", "ram_gib"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise InputError(f"{name} {value} must be a positive number of GiB")
        if self.resident_blocks is not None and not 0 <= self.resident_blocks <= spec.dit.num_layers:
            raise InputError(f"resident_blocks {self.resident_blocks} must be in 0..{spec.dit.num_layers}")
        if self.weights is Weights.CHECKPOINT:
            if self.ckpt_dir is None:
                raise InputError("weights 'checkpoint' needs a checkpoint folder (--ckpt-dir / ckpt_dir)")
            object.__setattr__(self, "ckpt_dir", Path(self.ckpt_dir))
            if not self.ckpt_dir.is_dir():
                raise InputError(f"checkpoint folder {self.ckpt_dir} not found")
        elif self.ckpt_dir is not None:
            raise InputError("random weights take no checkpoint folder; drop ckpt_dir or set weights 'checkpoint'")

    @property
    def spec(self) -> TaskSpec:
        return get_task(self.task)

    def settings(self) -> dict[str, Any]:
        """Every setting, JSON-serialisable, for the report."""
        raw = dataclasses.asdict(self)
        raw.update(precision=self.precision.value, engine=self.engine.value, weights=self.weights.value,
                   baselines=[b.value for b in self.baselines],
                   ckpt_dir=str(self.ckpt_dir) if self.ckpt_dir is not None else None)
        return raw


FIELDS = tuple(f.name for f in dataclasses.fields(Scenario))
_INT_FIELDS = ("frames", "steps", "resident_blocks", "seed")
_FLOAT_FIELDS = ("vram_gib", "ram_gib")


def _choice(kind: type[Enum], value: Any, name: str) -> Enum:
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(member.value for member in kind)
        raise InputError(f"{name} {value!r} is unknown; choose one of {choices}") from None


def parse_baselines(value: Any) -> tuple[Baseline, ...]:
    """'official,diffusers', a list of names, or 'none'/'' for no baseline."""
    if isinstance(value, str):
        value = [] if value.strip().lower() in ("", "none") else value.split(",")
    if not isinstance(value, (list, tuple)):
        raise InputError(f"baselines {value!r} must be a list such as official,diffusers (or none)")
    return tuple(dict.fromkeys(_choice(Baseline, v.strip() if isinstance(v, str) else v, "baseline")
                               for v in value))


def scenario_from_mapping(raw: Mapping[str, Any], where: str, base_dir: Path | None = None) -> Scenario:
    """A scenario from a file entry (already merged with the file's defaults)."""
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(FIELDS)}")
    if "task" not in raw:
        raise InputError(f"{where}: 'task' is required")
    values = dict(raw)
    for name, value in values.items():
        if name in _INT_FIELDS and value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise InputError(f"{where}: {name} must be an integer, got {value!r}")
        if name in _FLOAT_FIELDS and value is not None and (isinstance(value, bool)
                                                           or not isinstance(value, (int, float))):
            raise InputError(f"{where}: {name} must be a number, got {value!r}")
    if values.get("ckpt_dir") is not None:
        folder = Path(values["ckpt_dir"]).expanduser()
        values["ckpt_dir"] = folder if folder.is_absolute() or base_dir is None else base_dir / folder
    try:
        return Scenario(**values)
    except InputError as error:
        raise InputError(f"{where}: {error}") from None


def _parse_file(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return json.loads(text)
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise InputError(f"--scenario {path}: TOML needs Python 3.11; write the file as JSON") from None
    return tomllib.loads(text)


def load_scenario_file(path: Path) -> tuple[Scenario, ...]:
    path = Path(path)
    if path.suffix not in (".json", ".toml"):
        raise InputError(f"--scenario {path}: must be a .json or .toml file")
    if not path.is_file():
        raise InputError(f"--scenario {path}: file not found")
    try:
        raw = _parse_file(path)
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError and TOMLDecodeError
        raise InputError(f"--scenario {path}: not valid {path.suffix[1:].upper()}: {error}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("scenarios"), list) or not raw["scenarios"]:
        raise InputError(f"--scenario {path}: needs a non-empty 'scenarios' list")
    extra = sorted(set(raw) - {"defaults", "scenarios"})
    if extra:
        raise InputError(f"--scenario {path}: unknown top-level key(s) {', '.join(extra)}; "
                         "use 'defaults' and 'scenarios'")
    defaults = raw.get("defaults", {})
    if not isinstance(defaults, dict):
        raise InputError(f"--scenario {path}: 'defaults' must be a table of scenario keys")
    scenarios = []
    for index, entry in enumerate(raw["scenarios"], start=1):
        where = f"--scenario {path}: scenario #{index}"
        if not isinstance(entry, dict):
            raise InputError(f"{where}: must be a table of scenario keys")
        scenarios.append(scenario_from_mapping({**defaults, **entry}, where, base_dir=path.parent))
    return check_unique(scenarios, f"--scenario {path}")


def check_unique(scenarios: list[Scenario], where: str) -> tuple[Scenario, ...]:
    names = [scenario.name for scenario in scenarios]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InputError(f"{where}: scenario names must be unique; repeated: {', '.join(duplicates)}")
    return tuple(scenarios)


# What `wanrt bench` runs when given no scenario: the report on a GPU, and tiny
# scenarios on a CPU-only machine, which prove the harness and claim no performance.
GPU_SCENARIOS = (
    # 4 steps of the shift-12 schedule are 999, 972, 922 (high-noise expert) and 799
    # (low-noise): a short run that still swaps experts once.
    dict(name="t2v-A14B-480p-24GiB", task="t2v-A14B", size="832*480", frames=81, steps=4, vram_gib=24.0),
    dict(name="ti2v-5B-720p", task="ti2v-5B", size="1280*704", frames=121, steps=4),
)
CPU_SCENARIOS = (
    # One resident block of two: the other streams, so the streaming path is measured too.
    dict(name="tiny-t2v-streamed", task="tiny-t2v", size="64*64", frames=9, steps=3, resident_blocks=1),
    dict(name="tiny-ti2v", task="tiny-ti2v", size="128*64", frames=9, steps=3),
)


def default_scenarios(cuda: bool, baselines: tuple[Baseline, ...] = tuple(Baseline)) -> tuple[Scenario, ...]:
    return tuple(Scenario(**entry, baselines=baselines) for entry in (GPU_SCENARIOS if cuda else CPU_SCENARIOS))
