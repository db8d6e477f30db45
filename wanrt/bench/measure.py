"""Measuring one run: device-timeline clocks, memory sampled over time, per-phase peaks,
per-forward and per-step times.

On a GPU, times are CUDA events recorded on the current stream and read once at the end,
so the measured loop never waits for the host; peaks are `torch.cuda.max_memory_allocated`
reset at each phase. On a CPU, `time.perf_counter` and no device memory.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

# A memory timeline keeps at most this many samples in the report (evenly thinned).
MAX_TIMELINE_POINTS = 1000


def host_rss_bytes() -> int | None:
    """Resident set size of this process now (Linux /proc); None where unavailable."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class Clock:
    """Marks on the device's timeline: CUDA events on a GPU, perf_counter on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.method = "cuda_events" if self.cuda else "perf_counter"

    def mark(self) -> Any:
        if self.cuda:  # GPU only
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start: Any, end: Any) -> float:
        if self.cuda:  # GPU only: waits for `end` to have run
            end.synchronize()
            return start.elapsed_time(end) / 1000
        return end - start


@dataclass(frozen=True)
class MemorySample:
    t: float                      # seconds since the run started
    host_rss: int | None
    device_allocated: int | None


class MemorySampler:
    """Host RSS and allocated device memory every `interval` seconds on a background
    thread, plus a sample at every phase boundary, so short phases are seen too."""

    def __init__(self, device: torch.device, interval: float = 0.05) -> None:
        self.device = device
        self.interval = interval
        self.samples: list[MemorySample] = []
        self._origin = time.perf_counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="wanrt-bench-memory", daemon=True)

    def now(self) -> float:
        return time.perf_counter() - self._origin

    def sample(self) -> MemorySample:
        device = (torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else None)
        sample = MemorySample(self.now(), host_rss_bytes(), device)
        with self._lock:
            self.samples.append(sample)
        return sample

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "MemorySampler":
        self._origin = time.perf_counter()
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def host_peak(self, start: float, end: float) -> int | None:
        with self._lock:
            values = [s.host_rss for s in self.samples if start <= s.t <= end and s.host_rss is not None]
        return max(values) if values else None

    def timeline(self) -> dict[str, list]:
        with self._lock:
            samples = sorted(self.samples, key=lambda s: s.t)
        stride = max(1, -(-len(samples) // MAX_TIMELINE_POINTS))
        kept = samples[::stride]
        return {"t_s": [round(s.t, 4) for s in kept], "host_rss_bytes": [s.host_rss for s in kept],
                "device_allocated_bytes": [s.device_allocated for s in kept]}


@dataclass
class _Forward:
    expert: str
    start: Any
    end: Any


@dataclass
class _Step:
    index: int
    timestep: int
    expert: str
    end: Any
    streamed_bytes: int
    forwards: list[_Forward] = field(default_factory=list)


class RunRecorder:
    """Phases (time, device peak, host peak), and the DiT forwards and steps of sampling.

    Forwards are timed by wrapping what the sampling loop calls (`timed_forward`, used as
    the pipeline's `wrap_expert` or as module hooks); steps end at the step callback. A
    step's time minus its forwards is the scheduler, guidance and expert swap."""

    def __init__(self, device: torch.device, sampler: MemorySampler) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.clock = Clock(device)
        self.sampler = sampler
        self.phases: dict[str, dict[str, Any]] = {}
        self._phase_spans: list[dict[str, Any]] = []
        self._steps_start: Any = None
        self._steps: list[_Step] = []
        self._pending: list[_Forward] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda:  # GPU only
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        first = self.sampler.sample()
        start = self.clock.mark()
        yield
        end = self.clock.mark()
        seconds = self.clock.seconds(start, end)
        last = self.sampler.sample()
        self.phases[name] = {
            "seconds": seconds,
            "device_peak_bytes": torch.cuda.max_memory_allocated(self.device) if self.cuda else None,
            "host_peak_bytes": self.sampler.host_peak(first.t, last.t),
        }
        self._phase_spans.append({"name": name, "start_s": round(first.t, 4), "end_s": round(last.t, 4)})

    # ------------------------------------------------------------------ sampling

    def begin_steps(self) -> None:
        self._steps_start = self.clock.mark()

    def forward_started(self, expert: str) -> None:
        self._pending.append(_Forward(expert, self.clock.mark(), None))

    def forward_finished(self) -> None:
        self._pending[-1].end = self.clock.mark()

    def timed_forward(self, expert: str, forward: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            self.forward_started(expert)
            out = forward(*args, **kwargs)
            self.forward_finished()
            return out
        return run

    def step_finished(self, index: int, timestep: int, expert: str, streamed_bytes: int = 0) -> None:
        step = _Step(index, int(timestep), expert, self.clock.mark(), streamed_bytes, self._pending)
        self._pending = []
        self._steps.append(step)

    def steps(self, flops_per_forward: int) -> list[dict[str, Any]]:
        """Per-step records; `streamed_bytes` in a record is that step's share."""
        records, previous_end, previous_streamed = [], self._steps_start, 0
        for step in self._steps:
            seconds = self.clock.seconds(previous_end, step.end)
            forward_seconds = sum(self.clock.seconds(f.start, f.end) for f in step.forwards)
            flops = flops_per_forward * len(step.forwards)
            records.append({
                "index": step.index, "timestep": step.timestep, "expert": step.expert,
                "seconds": seconds, "forwards": len(step.forwards), "dit_forward_seconds": forward_seconds,
                "other_seconds": seconds - forward_seconds,
                "streamed_bytes": step.streamed_bytes - previous_streamed,
                "dit_flops": flops,
                "achieved_tflops": flops / forward_seconds / 1e12 if forward_seconds > 0 else None,
            })
            previous_end, previous_streamed = step.end, step.streamed_bytes
        return records

    def memory(self) -> dict[str, Any]:
        return {**self.sampler.timeline(), "phases": list(self._phase_spans)}


def steady_step_seconds(steps: list[dict[str, Any]]) -> float | None:
    """Median step time without each expert's first step (which holds the expert's
    placement on the device and first-call warm-up); None if no such step ran."""
    seen: set[str] = set()
    later = []
    for step in steps:
        if step["expert"] in seen:
            later.append(step["seconds"])
        seen.add(step["expert"])
    if not later:
        return None
    later.sort()
    middle = len(later) // 2
    return later[middle] if len(later) % 2 else (later[middle - 1] + later[middle]) / 2
