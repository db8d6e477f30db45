"""Writing a benchmark report: `report.json`, `report.md` and three PNG plots in one run
folder, `<results>/<run-name>/`, built in a hidden sibling folder and renamed into place,
so a results folder never holds a half-written report."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from wanrt.errors import InputError

# Beside every speedup of a tiny-* scenario, in the same stream and file as the figure.
SMOKE_CAVEAT = "tiny random-weight smoke model: proves the harness, no performance claim"

GIB = 2**30
REPORT_FILES = ("report.json", "report.md", "step_time.png", "memory.png", "achieved_vs_peak.png")
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_COMPONENTS = (("t5", "T5"), ("dit", "DiT"), ("vae_decode", "VAE decode"))


def device_slug(device_name: str) -> str:
    """A device name as a folder-name part: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


def default_run_name(device_name: str, now: datetime | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    return f"{now:%Y%m%d-%H%M%S}-{device_slug(device_name)}"


def require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise InputError("wanrt bench draws its plots with matplotlib: pip install 'wanrt[bench]'")


def run_folder(results: Path, run_name: str) -> Path:
    """Where the report goes; refuses a bad name or an existing report (before any run)."""
    if not _RUN_NAME.match(run_name):
        raise InputError(f"--name {run_name!r} must be a plain folder name (letters, digits, '.', '_', '-')")
    folder = Path(results) / run_name
    if folder.exists():
        raise InputError(f"--name {run_name}: {folder} already exists; choose another --name or --out")
    if Path(results).exists() and not Path(results).is_dir():
        raise InputError(f"--out {results} is a file; give a folder for the results")
    return folder


def write_folder_atomically(final: Path, fill: Callable[[Path], None]) -> Path:
    """Let `fill` write the folder's files into a hidden sibling, then rename it to `final`:
    a reader sees the whole folder or none of it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes 0700; a results folder is meant to be shared
        fill(staging)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def json_text(report: dict[str, Any]) -> str:
    # allow_nan=False: a NaN or infinity is a harness bug, not a number to publish.
    return json.dumps(report, indent=2, allow_nan=False) + "\n"


def write_report(report: dict[str, Any], results: Path, run_name: str) -> Path:
    """Write the report folder atomically and return its path."""

    def fill(folder: Path) -> None:
        (folder / "report.json").write_text(json_text(report))
        (folder / "report.md").write_text(markdown(report, run_name))
        write_plots(report, folder)

    return write_folder_atomically(run_folder(results, run_name), fill)


# ---------------------------------------------------------------------- Markdown


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def _bytes(value: int | None) -> str:
    if value is None:
        return "–"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value} B"


def _peak(phases: dict[str, dict], key: str) -> int | None:
    values = [phase[key] for phase in phases.values() if phase.get(key) is not None]
    return max(values) if values else None


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def _environment_lines(report: dict[str, Any]) -> list[str]:
    env = report["environment"]
    device, host, versions = env["device"], env["host"], env["versions"]
    peak = device["peak_tflops"]
    peak_text = (f"peak dense bf16 {peak['bf16']:g} / fp8 {_num(peak['fp8'], 4)} TFLOP/s ({peak['table_entry']})"
                 if isinstance(peak, dict) else "peak unknown: no achieved-vs-peak ratio")
    memory = f", {_bytes(device['total_memory_bytes'])}" if "total_memory_bytes" in device else ""
    return [f"- device: {device['name']}{memory}; {peak_text}",
            f"- host: {host['cpus']} CPUs, {_bytes(host['ram_bytes'])} RAM, {host['platform']}",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None),
            f"- weights: {report['weights']}", f"- created: {report['created_utc']}", ""]


def _scenario_lines(scenario: dict[str, Any]) -> list[str]:
    s, flops, runs = scenario["settings"], scenario["flops"], scenario["runs"]
    lines = [f"## Scenario `{scenario['name']}`", ""]
    cap = f"{s['vram_gib']:g} GiB" if s["vram_gib"] else "none"
    lines += [f"Settings: task {s['task']} · size {s['size']} · {s['frames']} frames · {s['steps']} steps · "
              f"precision {s['precision']} · engine {s['engine']} · VRAM cap {cap} · weights {s['weights']} · "
              f"baselines {', '.join(s['baselines']) or 'none'} · seed {s['seed']}", ""]
    lines += [f"FLOPs: {flops['tokens']} video tokens; one DiT forward {flops['dit_forward']['total'] / 1e12:.4g} "
              f"TFLOP; sampling ({flops['forwards_per_step']} forwards/step) {flops['sampling'] / 1e12:.4g} TFLOP; "
              f"T5 {flops['t5'] / 1e12:.4g} TFLOP; VAE decode {flops['vae_decode'] / 1e12:.4g} TFLOP "
              f"({flops['vae_decode_method']})", ""]
    rows = []
    for name, run in runs.items():
        if run["status"] != "ok":
            rows.append([name, f"{run['status']}: {run['note']}"] + ["–"] * 10)
            continue
        phases, summary = run["phases"], run["summary"]
        achieved = summary["achieved_tflops"]
        fraction = summary["dit_fraction_of_peak"]
        rows.append([name, "ok", _num(phases.get("t5", {}).get("seconds")), _num(phases["sampling"]["seconds"]),
                     _num(phases["decode"]["seconds"]), _num(summary["steady_step_seconds"]), _num(achieved["dit"]),
                     "–" if fraction is None else f"{100 * fraction:.1f}%",
                     _bytes(_peak(phases, "device_peak_bytes")), _bytes(_peak(phases, "host_peak_bytes")),
                     _bytes(summary["streamed_bytes"]), _num(summary["h2d_gb_per_s"])])
    lines += _table(["run", "status", "T5 s", "sampling s", "decode s", "steady step s", "DiT TFLOP/s",
                     "of peak", "peak VRAM", "peak host RSS", "streamed", "H2D GB/s"], rows)
    ratio_rows = [[name, _num(r["sampling_speedup"]), _num(r["decode_speedup"]),
                   _num(r["sampling_and_decode_speedup"]), _num(r["peak_vram_ratio"])]
                  for name, r in scenario["ratios"].items() if r is not None]
    if ratio_rows:
        caveat = f" ({SMOKE_CAVEAT})" if s["task"].startswith("tiny-") else ""
        lines += [f"Speedup of wanrt over each baseline (baseline s / wanrt s){caveat}:", ""]
        lines += _table(["baseline", "sampling", "decode", "sampling + decode", "peak VRAM ratio"], ratio_rows)
    fidelity_rows = [[name, _num(run["fidelity"]["latents_rel_l2"]), _num(run["fidelity"]["latents_max_abs"]),
                      "identical" if run["fidelity"]["identical"] else _num(run["fidelity"]["video_psnr_db"], 4)]
                     for name, run in runs.items() if "fidelity" in run]
    if fidelity_rows:
        lines += [f"Fidelity against `{scenario['fidelity_reference']}` (same weights, noise and embeddings):", ""]
        lines += _table(["run", "latents rel L2", "latents max abs", "video PSNR dB"], fidelity_rows)
    wanrt = runs["wanrt"]
    if wanrt["status"] == "ok":
        lines += ["Steps of the wanrt run:", ""]
        lines += _table(["step", "t", "expert", "s", "DiT forwards s", "other s", "streamed", "DiT TFLOP/s"],
                        [[str(st["index"]), str(st["timestep"]), st["expert"], _num(st["seconds"]),
                          _num(st["dit_forward_seconds"]), _num(st["other_seconds"]),
                          _bytes(st["streamed_bytes"]), _num(st["achieved_tflops"])]
                         for st in wanrt["steps"]])
        lines += [f"wanrt DiT placement: {wanrt['setup']['dit']}", ""]
    for name, run in runs.items():
        if name == "diffusers" and run["status"] == "ok":
            setup = run["setup"]
            lines += [f"diffusers {setup['diffusers']}: offload `{setup['offload']}` ({setup['offload_reason']}); "
                      f"{setup['scheduler']}; text encoder {setup['text_encoder']}", ""]
    return lines


def markdown(report: dict[str, Any], run_name: str) -> str:
    lines = [f"# wanrt bench: {run_name}", ""]
    for note in (report["note"], report["weights_note"]):
        if note:
            lines += [f"> **{note}**", ""]
    lines += _environment_lines(report)
    lines += ["Definitions:", "", *(f"- {key}: {text}" for key, text in report["definitions"].items()), ""]
    for scenario in report["scenarios"]:
        lines += _scenario_lines(scenario)
    lines += ["Plots: `step_time.png` (per-step time by component), `memory.png` (memory over time), "
              "`achieved_vs_peak.png` (achieved TFLOP/s against the device peak).", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------- plots


def _ok_runs(scenario: dict[str, Any]) -> dict[str, dict]:
    return {name: run for name, run in scenario["runs"].items() if run["status"] == "ok"}


def write_plots(report: dict[str, Any], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    scenarios = report["scenarios"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    suffix = " (CPU-only: harness check, no performance claim)" if report["cpu_only"] else ""

    def figure(title: str):
        fig, axes = plt.subplots(len(scenarios), 1, figsize=(10, 3.6 * len(scenarios)), squeeze=False)
        fig.suptitle(title + suffix)
        return fig, axes[:, 0]

    fig, axes = figure("Per-step time by component")
    for ax, scenario in zip(axes, scenarios):
        runs = _ok_runs(scenario)
        width = 0.8 / max(1, len(runs))
        for slot, (name, run) in enumerate(runs.items()):
            x = [st["index"] + (slot - (len(runs) - 1) / 2) * width for st in run["steps"]]
            forwards = [st["dit_forward_seconds"] for st in run["steps"]]
            color = colors[slot % len(colors)]
            ax.bar(x, forwards, width, color=color, label=f"{name}: DiT forwards")
            ax.bar(x, [st["other_seconds"] for st in run["steps"]], width, bottom=forwards, color=color,
                   alpha=0.35, label=f"{name}: scheduler, swap, waits")
        ax.set_xticks(range(scenario["settings"]["steps"]))
        ax.set(title=scenario["name"], xlabel="step", ylabel="seconds")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(folder / "step_time.png", dpi=100)
    plt.close(fig)

    fig, axes = figure("Memory over time (each run from its own start)")
    for ax, scenario in zip(axes, scenarios):
        for slot, (name, run) in enumerate(_ok_runs(scenario).items()):
            memory, color = run["memory"], colors[slot % len(colors)]
            for key, style, label in (("device_allocated_bytes", "-", "device allocated"),
                                      ("host_rss_bytes", "--", "host RSS")):
                points = [(t, v / GIB) for t, v in zip(memory["t_s"], memory[key]) if v is not None]
                if points:
                    ax.plot(*zip(*points), style, color=color, label=f"{name}: {label}")
            for span in memory["phases"]:  # where each phase of the run began
                ax.axvline(span["start_s"], color=color, alpha=0.3, linewidth=0.8)
                ax.annotate(span["name"], (span["start_s"], 1.0), xycoords=("data", "axes fraction"),
                            fontsize="x-small", color=color, rotation=90, va="top")
        ax.set(title=scenario["name"], xlabel="seconds since the run started", ylabel="GiB")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(folder / "memory.png", dpi=100)
    plt.close(fig)

    fig, axes = figure("Achieved TFLOP/s against the device peak")
    for ax, scenario in zip(axes, scenarios):
        runs = _ok_runs(scenario)
        width = 0.8 / max(1, len(runs))
        for slot, (name, run) in enumerate(runs.items()):
            achieved = run["summary"]["achieved_tflops"]
            x = [index + (slot - (len(runs) - 1) / 2) * width for index in range(len(_COMPONENTS))]
            ax.bar(x, [achieved[key] or 0.0 for key, _ in _COMPONENTS], width,
                   color=colors[slot % len(colors)], label=name)
        ax.set_xticks(range(len(_COMPONENTS)), [label for _, label in _COMPONENTS])
        # One line per matmul precision the runs used (a quantized run has its own peak).
        peaks = {run["setup"]["matmul_precision"]: run["summary"]["peak_tflops"] for run in runs.values()
                 if run["summary"]["peak_tflops"] is not None}
        for style, (precision, value) in zip(("--", ":", "-."), sorted(peaks.items())):
            ax.axhline(value, color="black", linestyle=style, label=f"device peak {precision} {value:g}")
        title = scenario["name"] if peaks else f"{scenario['name']} (device peak unknown: no ratio)"
        ax.set(title=title, ylabel="TFLOP/s")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(folder / "achieved_vs_peak.png", dpi=100)
    plt.close(fig)
