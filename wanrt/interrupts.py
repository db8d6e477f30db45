"""Ctrl-C and SIGTERM as an exception, so every temporary file is removed on the way out
and the user is told in one line what of the run was kept.

Python turns SIGINT into KeyboardInterrupt but lets SIGTERM (what `kill`, systemd,
Kubernetes and torchrun send) end the process on the spot, skipping every `finally`: a
video being muxed then leaves its hidden temporary file behind. While
`signals_as_interrupts` is active both raise `Interrupted` instead.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

NOTHING_KEPT = "nothing was written"


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, like KeyboardInterrupt, so that code
    catching `Exception` does not swallow it. `kept` says what of the run is on disk;
    the stage that was running sets it on the way out."""

    def __init__(self, signum: int, kept: str = NOTHING_KEPT) -> None:
        super().__init__(signum, kept)
        self.signum = signum
        self.kept = kept

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


@contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """Raise `Interrupted` on SIGINT and SIGTERM inside the block (main thread only:
    Python runs signal handlers there alone)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, _raise_interrupted) for signum in handled}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def process_alive(pid: int) -> bool:
    """Whether process `pid` (on this machine) still runs. A killed process stays a zombie
    until its parent (torchrun's agent) reaps it, and signals still reach a zombie: on
    Linux its state in /proc tells."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # "pid (name) state ...": the name may hold spaces and parentheses.
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        pass  # no /proc (macOS): whether it exists at all
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by another user
    return True
