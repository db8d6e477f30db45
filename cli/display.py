"""The terminal display of `wanrt.progress`: one rich progress area on stderr shared by
every tracked loop of a command (loading shards, T5, sampling, VAE steps, export...).

Drawn only on a terminal; redirected or captured output gets no bars, and the result
paths always go to stdout.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TaskID, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

from wanrt.pipelines import StepInfo
from wanrt.progress import Reporter, active_reporter


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.speed
        if not speed:
            return Text("-- it/s")
        return Text(f"{speed:.2f} it/s" if speed >= 1 else f"{1 / speed:.1f} s/it")


class TerminalProgress:
    """A `wanrt.progress.Reporter` drawing rich bars: description, bar, i/N, a note (the
    active expert while sampling), rate, elapsed and ETA. The live area runs only while
    a bar is open, so plain lines printed between phases stay readable."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True, soft_wrap=True, highlight=False)
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[note]}"),
            _RateColumn(), TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
            disable=not self.console.is_terminal)
        self._open: set[TaskID] = set()

    def start(self, description: str, total: int | None) -> TaskID:
        if not self._open:
            self._progress.start()
        handle = self._progress.add_task(description, total=total, note="")
        self._open.add(handle)
        # Drawn now, not at the next 10 Hz tick: a phase shorter than a tick still shows.
        self._progress.refresh()
        return handle

    def update(self, handle: TaskID, completed: int, note: str = "", total: int | None = None) -> None:
        changed = note != self._progress.tasks[self._progress.task_ids.index(handle)].fields["note"]
        self._progress.update(handle, completed=completed, note=note, **({} if total is None else {"total": total}))
        if changed:  # a new phase (the other expert): drawn now, however fast the steps run
            self._progress.refresh()

    def finish(self, handle: TaskID) -> None:
        if handle not in self._open:
            return
        self._open.discard(handle)
        self._progress.refresh()  # its final count
        self._progress.remove_task(handle)
        if not self._open:
            self._progress.stop()

    def print(self, line: str) -> None:
        """A phase line on stderr, above the bars."""
        self.console.print(line, markup=False)


class RunDisplay:
    """Sampling progress (step i/N, active expert, rate, ETA), then the decode phase line,
    on the command's progress display."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self._reporter: Reporter = active_reporter() or TerminalProgress()
        self._handle: object | None = None

    def __enter__(self) -> "RunDisplay":
        self._handle = self._reporter.start("sampling", self.steps)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._reporter.finish(self._handle)

    def on_step(self, info: StepInfo) -> None:
        # `total`: an s2v run learns each clip's step count as it starts it.
        self._reporter.update(self._handle, info.index + 1, note=f"{info.expert.value.replace('_', '-')} expert",
                              total=info.total)

    def on_decode(self) -> None:
        self._reporter.finish(self._handle)
        typer.echo("decoding the latents with the VAE and writing the video...", err=True)
