"""`wanrt bench`: measure scenarios (wanrt and its baselines, same machine, same run) and
write a report folder: JSON, Markdown and PNG plots. See `wanrt.bench`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from wanrt.bench.harness import CPU_NOTE, check_runnable, device_name, run_benchmarks
from wanrt.bench.report import SMOKE_CAVEAT, default_run_name, require_matplotlib, run_folder, write_report
from wanrt.bench.scenarios import Scenario, Weights, default_scenarios, load_scenario_file, parse_baselines
from wanrt.engines.base import EngineKind
from wanrt.errors import InputError
from wanrt.runtime.planner import Precision

DEFAULT_BASELINES = "official,diffusers"


def _flag_scenario(task: str, flags: dict[str, Any], ckpt_dir: Path | None, random_weights: bool,
                   baselines: str) -> Scenario:
    if ckpt_dir is not None and random_weights:
        raise InputError("--random-weights and --ckpt-dir exclude each other; pick one")
    weights = Weights.CHECKPOINT if ckpt_dir is not None else Weights.RANDOM
    return Scenario(task=task, weights=weights, ckpt_dir=ckpt_dir, baselines=parse_baselines(baselines), **flags)


def bench_command(
    scenario_file: Annotated[Path | None, typer.Option(
        "--scenario", help="Scenario file (.json or .toml); replaces the scenario flags.")] = None,
    task: Annotated[str | None, typer.Option("--task", help="Task of a one-scenario run, e.g. t2v-A14B.")] = None,
    size: Annotated[str | None, typer.Option("--size", help="WIDTH*HEIGHT (default: the task's).")] = None,
    frames: Annotated[int | None, typer.Option("--frames", "--frame-num",
                                               help="4n+1 frames (default: the task's).")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Sampling steps (default: the task's).")] = None,
    precision: Annotated[Precision, typer.Option("--precision", help="DiT weight precision.")] = Precision.BF16,
    engine: Annotated[EngineKind, typer.Option("--engine", help="What runs the DiT (wanrt run only).")]
    = EngineKind.EAGER,
    vram: Annotated[float | None, typer.Option("--vram", help="GPU memory cap and budget, GiB.")] = None,
    ram: Annotated[float | None, typer.Option("--ram", help="Host RAM budget for the planner, GiB.")] = None,
    resident_blocks: Annotated[int | None, typer.Option(
        "--resident-blocks", help="Keep this many DiT blocks resident, stream the rest (skips the planner).")] = None,
    random_weights: Annotated[bool, typer.Option(
        "--random-weights", help="Random weights of the task's full size (the default; labelled as such).")] = False,
    ckpt_dir: Annotated[Path | None, typer.Option("--ckpt-dir", "--ckpt_dir",
                                                  help="A real checkpoint folder instead of random weights.")] = None,
    baselines: Annotated[str, typer.Option(
        "--baselines", help="Comma-separated: official, diffusers; or none.")] = DEFAULT_BASELINES,
    seed: Annotated[int, typer.Option("--seed", help="Noise and random-weight seed.")] = 0,
    out: Annotated[Path, typer.Option("--out", help="Results folder; the report goes in <out>/<name>/.")]
    = Path("benchmarks/results"),
    name: Annotated[str | None, typer.Option("--name", help="Report folder name (default: time and device).")]
    = None,
) -> None:
    """Time, memory, FLOPs and fidelity of wanrt beside the official strategy and diffusers."""
    flags = dict(size=size, frames=frames, steps=steps, precision=precision, engine=engine, vram_gib=vram,
                 ram_gib=ram, resident_blocks=resident_blocks, seed=seed)
    given = [flag for flag, value, default in (
        ("--task", task, None), ("--size", size, None), ("--frames", frames, None), ("--steps", steps, None),
        ("--precision", precision, Precision.BF16), ("--engine", engine, EngineKind.EAGER), ("--vram", vram, None),
        ("--ram", ram, None), ("--resident-blocks", resident_blocks, None), ("--ckpt-dir", ckpt_dir, None),
        ("--random-weights", random_weights, False), ("--seed", seed, 0),
        ("--baselines", baselines, DEFAULT_BASELINES)) if value != default]
    cuda = torch.cuda.is_available()
    if scenario_file is not None:
        if given:
            raise InputError(f"--scenario replaces the scenario flags; drop {', '.join(given)}")
        scenarios = load_scenario_file(scenario_file)
    elif task is not None:
        scenarios = (_flag_scenario(task, flags, ckpt_dir, random_weights, baselines),)
    elif set(given) - {"--baselines"}:
        raise InputError(f"{given[0]} describes a scenario; give --task too (or a --scenario file)")
    else:
        scenarios = default_scenarios(cuda, parse_baselines(baselines))
    device = torch.device("cuda" if cuda else "cpu")
    run_name = name or default_run_name("cpu" if not cuda else device_name(device))
    # Refused before anything runs: full-size models on a CPU, an existing report, a bad
    # name, no matplotlib.
    check_runnable(scenarios, device)
    run_folder(out, run_name)
    require_matplotlib()
    if not cuda:
        typer.echo(f"note: {CPU_NOTE}", err=True)
    report = run_benchmarks(scenarios, device, progress=lambda message: typer.echo(message, err=True))
    folder = write_report(report, out, run_name)
    for scenario in report["scenarios"]:
        wanrt = scenario["runs"]["wanrt"]
        line = f"{scenario['name']}: wanrt {wanrt['status']}"
        if wanrt["status"] == "ok":
            line += f", sampling {wanrt['phases']['sampling']['seconds']:.3g} s"
        for baseline, ratio in scenario["ratios"].items():
            run = scenario["runs"][baseline]
            line += (f"; {baseline} {run['status']}" if ratio is None
                     else f"; {ratio['sampling_speedup']:.3g}x sampling speedup over {baseline}")
        if scenario["settings"]["task"].startswith("tiny-"):
            line += f" ({SMOKE_CAVEAT})"
        typer.echo(line)
    typer.echo(f"report: {folder / 'report.md'}")
