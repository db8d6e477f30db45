"""Processes of a multi-GPU run: launching them, what they must agree on, how they fail.

`relaunch` starts `python -m wanrt <command> ...` once per GPU under torch.distributed.run
(torchrun); `run_rank` is what each of those processes runs. Three rules hold every run:

- Every rank agrees before any model loads: the arguments, the seed (rank 0 draws a random
  one and broadcasts it) and the SHA-256 of every checkpoint file are compared, and a
  mismatch stops all ranks with one line naming what differs (`check_agreement`).
- Waits that can legitimately last long (rank 0 decoding a video while the others wait for
  the next command, the low-noise rank waiting for 20 high-noise steps) are polls on the
  rendezvous store, not collectives, so the collective timeout can stay short.
- A rank that raises publishes one line in the store and every rank exits within about a
  second: each runs a watcher thread that polls the store, rank 0 prints the root cause,
  and nobody sits in a collective until a 30-minute timeout.
- A rank that dies without raising (SIGKILL, the out-of-memory killer) or freezes
  (SIGSTOP, a machine swapping to a halt) is found by its silence: the watcher threads
  beat a counter in the store, and a rank whose counter has not moved for
  `HEARTBEAT_TIMEOUT_S` stops the run, named as the root cause. A peer's death seen as a
  broken connection ("Connection reset by peer") is reported as that rank's death.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterable, Mapping, NoReturn

import torch
import torch.distributed as dist

import wanrt
from wanrt.errors import InputError, WanrtError
from wanrt.interrupts import process_alive

# A collective that has not completed in this long is a hang (a rank stuck without raising);
# the long waits of a healthy run go through the store instead (`RankContext`). Loading
# the models is the one stretch between collectives whose length varies between ranks.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
FAILURE_POLL_SECONDS = 0.5
# How long a failing rank waits for rank 0 to print its message before exiting anyway.
REPORT_WAIT_SECONDS = 10.0
_STORE_WAIT = timedelta(seconds=1)
# A rank whose heartbeat has not moved for this long is dead or frozen ($WANRT_HEARTBEAT_TIMEOUT_S
# overrides it). Long enough for a swap storm or a debugger's pause to pass.
HEARTBEAT_TIMEOUT_S = float(os.environ.get("WANRT_HEARTBEAT_TIMEOUT_S", 60.0))
_USER_ERROR_EXIT_CODE = 2


class RankMismatchError(WanrtError):
    """The ranks of one run were started with different arguments, seeds or files."""


def under_torchrun() -> bool:
    """True in a process started by torch.distributed.run (it sets these variables)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def launched_world_size() -> int:
    return int(os.environ["WORLD_SIZE"]) if under_torchrun() else 1


def is_rank_zero() -> bool:
    """Whether this process prints run-level messages (always, outside torchrun)."""
    return os.environ.get("RANK", "0") == "0"


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if isinstance(error, WanrtError) else f"{type(error).__name__}: {text}"


# ---------------------------------------------------------------------- launching


def relaunch(nproc: int, arguments: list[str]) -> int:
    """Run `python -m wanrt <arguments>` in `nproc` processes on this machine under
    torch.distributed.run, in this process (which becomes the launcher), and return the
    exit code of the run: rank 0's when a rank failed, as it exits with the root cause's."""
    # The launcher logs through loggers configured from $LOGLEVEL when first imported:
    # errors only by default, since rank 0 prints the root cause itself.
    os.environ.setdefault("LOGLEVEL", "ERROR")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    launcher_args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--module", "wanrt", *arguments])
    try:
        run(launcher_args)
    except ChildFailedError as error:
        # Rank 0 has printed the root cause; the launcher's own report would repeat it.
        failures = error.failures
        chosen = failures.get(0) or next(iter(failures.values()))
        return chosen.exitcode if chosen.exitcode > 0 else 1
    return 0


def check_gpu_count(nproc: int, device: torch.device | None) -> None:
    """Refuse, before launching anything, more CUDA processes than GPUs; CPU processes
    (gloo, for testing) only when asked for with --device cpu."""
    if device is not None and device.type == "cpu":
        return
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if nproc > available:
        raise InputError(f"--gpus {nproc}: this machine has {available} usable CUDA GPU(s); use --gpus "
                         f"{available} or fewer (or --device cpu to test with CPU processes)")


# ---------------------------------------------------------------------- failures


class FailureMonitor:
    """Publishes this rank's failure and watches for the others', on its own store client.

    The root cause is the first failure published (`compare_set` on one key); ranks that
    fail afterwards (a peer vanished mid-collective) defer to it. Rank 0 prints it and
    acknowledges; the failing rank waits for that before exiting, so the launcher, which
    stops every process as soon as one exits, never cuts the message off.
    """

    def __init__(self, rank: int, store: dist.Store, prefix: str, world_size: int = 1) -> None:
        self.rank = rank
        self._store = store
        self._prefix = prefix
        self._root_key = f"{prefix}/failure"
        self._ack_key = f"{prefix}/failure_reported"
        self._peers = [peer for peer in range(world_size) if peer != rank]
        # Each peer's last heartbeat count and when this rank saw it change.
        self._beats: dict[int, tuple[int, float]] = {}
        store.set(f"{prefix}/process/{rank}", f"{socket.gethostname()}|{os.getpid()}")
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="wanrt-failure-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stopped.wait(FAILURE_POLL_SECONDS):
            try:
                published = self._store.check([self._root_key])
            except Exception:
                if self._stopped.is_set():
                    return
                # The store lives in the launcher (or rank 0): it is gone, so is the run.
                os._exit(1)
            if published:
                code, rank, message = self._decode(self._store.get(self._root_key))
                if rank != self.rank:  # our own failure is reported by the main thread
                    self._report_and_exit(code, rank, message)
            silent = self._beat_and_check()
            if silent is not None:
                self._publish_and_exit(silent, f"stopped responding: no heartbeat for {HEARTBEAT_TIMEOUT_S:.0f} s "
                                               "(the process froze or was killed without a trace)")

    def _beat_and_check(self) -> int | None:
        """Beat this rank's heartbeat; the first peer silent for HEARTBEAT_TIMEOUT_S, if any."""
        self._store.add(f"{self._prefix}/heartbeat/{self.rank}", 1)
        now = time.monotonic()
        for peer in self._peers:
            count = self._store.add(f"{self._prefix}/heartbeat/{peer}", 0)
            last_count, since = self._beats.get(peer, (-1, now))
            if count != last_count:
                self._beats[peer] = (count, now)
            elif now - since > HEARTBEAT_TIMEOUT_S:
                return peer
        return None

    def _dead_peer(self) -> tuple[int, str] | None:
        """A peer on this machine whose process is gone, and how to say so."""
        host = socket.gethostname()
        for peer in self._peers:
            key = f"{self._prefix}/process/{peer}"
            if not self._store.check([key]):
                continue
            peer_host, pid = self._store.get(key).decode().split("|")
            if peer_host == host and not process_alive(int(pid)):
                return peer, (f"died: its process {pid} is gone without a word (killed by a signal, e.g. "
                              "SIGKILL or the kernel's out-of-memory killer)")
        return None

    def _publish_and_exit(self, rank: int, message: str) -> NoReturn:
        """Publish another rank's death as the root cause (unless one came first) and stop."""
        code, rank, message = self._decode(self._store.compare_set(self._root_key, "", f"1|{rank}|{message}"))
        self._report_and_exit(code, rank, message)

    def fail(self, error: BaseException) -> NoReturn:
        """Called by the main thread with the exception that ended this rank's work."""
        if not isinstance(error, WanrtError):
            # A broken connection is often a peer's death, not this rank's fault.
            dead = self._dead_peer()
            if dead is not None:
                self._publish_and_exit(*dead)
        code = _USER_ERROR_EXIT_CODE if isinstance(error, WanrtError) else 1
        mine = f"{code}|{self.rank}|{one_line(error)}"
        code, rank, message = self._decode(self._store.compare_set(self._root_key, "", mine))
        if rank == self.rank and not isinstance(error, WanrtError):
            traceback.print_exception(error, file=sys.stderr)  # a bug: its trace, on this rank
        if rank == self.rank and self.rank != 0:
            deadline = time.monotonic() + REPORT_WAIT_SECONDS
            while time.monotonic() < deadline and not self._store.check([self._ack_key]):
                time.sleep(0.05)
        self._report_and_exit(code, rank, message)

    def _report_and_exit(self, code: int, rank: int, message: str) -> NoReturn:
        with self._lock:  # the watcher and the main thread may both get here
            if self.rank == 0:
                print(f"error: rank {rank}: {message}", file=sys.stderr, flush=True)
                self._store.set(self._ack_key, "1")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    @staticmethod
    def _decode(value: bytes) -> tuple[int, int, str]:
        code, rank, message = value.decode().split("|", 2)
        return int(code), int(rank), message


# ---------------------------------------------------------------------- rank context


@dataclass
class RankContext:
    """This process's place in the run, and messages to the other ranks.

    A message first meets its participants in the store: each posts a key and polls for the
    others' (unbounded), and the collective starts only once all are there, so it completes
    at once. A rank busy for minutes (decoding a video, running 20 high-noise steps) is
    never waited for inside a collective, whose timeout can then stay short."""

    rank: int
    world_size: int
    device: torch.device
    backend: str
    store: dist.Store
    prefix: str
    monitor: FailureMonitor
    _sequence: Counter = field(default_factory=Counter)

    def next_key(self, channel: str) -> str:
        """A store key unique to this call (every rank makes the same calls in the same order)."""
        self._sequence[channel] += 1
        return f"{self.prefix}/{channel}/{self._sequence[channel]}"

    def wait_for(self, key: str) -> None:
        while True:
            try:
                self.store.wait([key], _STORE_WAIT)
                return
            except dist.DistStoreError:
                continue  # not yet; a failed peer ends this process through the monitor

    def _meet(self, channel: str, ranks: Iterable[int]) -> None:
        key = self.next_key(channel)
        self.store.set(f"{key}/{self.rank}", "1")
        for rank in ranks:
            self.wait_for(f"{key}/{rank}")

    def broadcast(self, message: Any = None, src: int = 0) -> Any:
        """`message` from `src` to every rank (the others pass nothing)."""
        self._meet(f"broadcast/{src}", range(self.world_size))
        box = [message]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def gather(self, items: list) -> list:
        """Every rank's `items`, concatenated in rank order, on every rank."""
        self._meet("gather", range(self.world_size))
        parts: list = [None] * self.world_size
        dist.all_gather_object(parts, items)
        return [item for part in parts for item in part]

    def send(self, message: Any, dst: int) -> None:
        self._meet(f"p2p/{self.rank}-{dst}", (self.rank, dst))
        dist.send_object_list([message], dst=dst)

    def recv(self, src: int) -> Any:
        self._meet(f"p2p/{src}-{self.rank}", (src, self.rank))
        box = [None]
        dist.recv_object_list(box, src=src)
        return box[0]

    def finish(self) -> None:
        """End a successful run on every rank: stop watching, then leave together."""
        self.monitor.stop()
        dist.barrier()
        dist.destroy_process_group()


def _store_client() -> dist.Store:
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=COLLECTIVE_TIMEOUT)


def init_distributed(device: torch.device | None = None) -> RankContext:
    """Join the run torchrun started: NCCL on `cuda:LOCAL_RANK`, gloo on the CPU.

    `device` is what the user asked for (None: CUDA when present); only its type counts,
    the index is the local rank's."""
    if not under_torchrun():
        raise InputError("not started by torchrun: use `wanrt generate --gpus N` or "
                         "`torchrun --nproc_per_node N -m wanrt generate ...`")
    rank, world_size, local_rank = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        available = torch.cuda.device_count()
        if local_rank >= available:
            raise InputError(f"rank {rank} needs cuda:{local_rank} but this machine has {available} "
                             "GPU(s); use fewer --gpus")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # A failed NCCL collective aborts the communicator instead of hanging.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    # Keys are scoped to this launch (a store may outlive one, e.g. across restarts).
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", os.environ["MASTER_PORT"])
    prefix = f"wanrt/{run_id}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    # The watcher gets its own connection: a client serialises its requests, and the main
    # thread may sit in a store wait.
    monitor = FailureMonitor(rank, _store_client(), prefix, world_size)
    return RankContext(rank, world_size, device, backend, _store_client(), prefix, monitor)


def run_rank(body: Callable[[RankContext], Any], device: torch.device | None = None) -> NoReturn:
    """The whole life of one torchrun process: join, run `body`, leave; never returns.

    Any exception ends every rank (see `FailureMonitor`). Success and failure both end
    with `os._exit`: the interpreter's own shutdown can abort in gloo's worker threads
    after the run is over, turning a finished run into a crash report."""
    context = init_distributed(device)
    try:
        body(context)
        context.finish()
    except BaseException as error:  # KeyboardInterrupt too: every rank must stop
        context.monitor.fail(error)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------------- agreement


def agree_on_seed(context: RankContext, seed: int) -> int:
    """The seed every rank uses: `seed`, or for a negative one a random seed drawn on rank
    0 (the official CLI's range) and broadcast."""
    drawn = secrets.randbelow(sys.maxsize + 1) if seed < 0 and context.rank == 0 else seed
    return context.broadcast(drawn if context.rank == 0 else None)


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def check_agreement(context: RankContext, parts: Mapping[str, Any]) -> None:
    """Compare a digest of each part across ranks and stop every rank if any differs.

    `parts` maps a name ("arguments", "checkpoint files") to JSON-able data; the wanrt and
    torch versions are always compared too. The digests meet in the store, not in a
    collective: a rank still hashing a cold checkpoint may take minutes."""
    digests = {name: _digest(value) for name, value in parts.items()}
    digests["software versions"] = _digest([wanrt.__version__, torch.__version__])
    key = context.next_key("agreement")
    context.store.set(f"{key}/{context.rank}", json.dumps(digests))
    gathered = []
    for rank in range(context.world_size):
        context.wait_for(f"{key}/{rank}")
        gathered.append(json.loads(context.store.get(f"{key}/{rank}")))
    differing = [name for name in digests if len({ranks.get(name) for ranks in gathered}) > 1]
    if differing:
        odd = [rank for rank, ranks in enumerate(gathered) if ranks != gathered[0]]
        raise RankMismatchError(
            f"the ranks disagree on the {', '.join(differing)} (rank(s) {', '.join(map(str, odd))} "
            "differ from rank 0); start every rank with the same arguments, seed and checkpoint files")
