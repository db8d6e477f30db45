"""Worker of tests/test_reliability.py: rank 1 goes silent while rank 0 waits for it in a
collective, either killed with SIGKILL or frozen (its heartbeat stops, nothing raises).

Without the heartbeat rank 0 would wait for the collective timeout (10 minutes) or report
the broken connection as its own error; with it, rank 0 names rank 1.

usage: torchrun --standalone --nproc_per_node 2 distributed_silent_failure_worker.py kill|freeze
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from wanrt.distributed.launch import RankContext, run_rank


def main(context: RankContext) -> None:
    dist.barrier()  # both ranks are up before rank 1 goes silent
    if context.rank == 1:
        if sys.argv[1] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        context.monitor.stop()  # frozen: no heartbeat, no progress, no error
        time.sleep(600)
    box = [None]
    dist.broadcast_object_list(box, src=1)  # rank 1 never sends


if __name__ == "__main__":
    run_rank(main, torch.device("cpu"))
