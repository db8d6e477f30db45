"""Progress of the library's long loops (shards loaded, causal VAE steps, components
exported, calibration forwards, preview candidates), shown by whichever front end
installed a reporter.

The library only wraps its loops in `track(...)`; the CLI installs a terminal display
with `reporting(...)`. With no reporter installed (the Python API, tests) `track` yields
the items unchanged, so library code never depends on a display.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator, Sized
from typing import Protocol, TypeVar

Item = TypeVar("Item")


class Reporter(Protocol):
    def start(self, description: str, total: int | None) -> object:
        """Begin a bar; returns the handle the other calls take."""

    def update(self, handle: object, completed: int, note: str = "", total: int | None = None) -> None:
        """`completed` units of the bar are done (of `total`, when it changes); `note` is
        shown beside it."""

    def finish(self, handle: object) -> None: ...


_active: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar("wanrt_progress", default=None)


def track(items: Iterable[Item], description: str, total: int | None = None) -> Iterator[Item]:
    """`items`, reporting one unit done as each next item is asked for (so the last unit
    counts once the caller has finished with it)."""
    reporter = _active.get()
    if reporter is None:
        yield from items
        return
    if total is None and isinstance(items, Sized):
        total = len(items)
    handle = reporter.start(description, total)
    try:
        for done, item in enumerate(items, start=1):
            yield item
            reporter.update(handle, done)
    finally:
        reporter.finish(handle)


@contextlib.contextmanager
def phase(description: str) -> Iterator[None]:
    """A step with no countable parts (one T5 forward): shown with its elapsed time."""
    reporter = _active.get()
    handle = reporter.start(description, None) if reporter is not None else None
    try:
        yield
    finally:
        if reporter is not None:
            reporter.finish(handle)


def active_reporter() -> Reporter | None:
    """The reporter installed by the front end, for progress that is not a loop over items
    (the sampling steps, reported from the step callback)."""
    return _active.get()


@contextlib.contextmanager
def reporting(reporter: Reporter) -> Iterator[None]:
    """Show the `track`ed loops run inside this block with `reporter`."""
    token = _active.set(reporter)
    try:
        yield
    finally:
        _active.reset(token)
