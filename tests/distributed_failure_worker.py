"""Worker of tests/test_distributed.py: rank 1 raises while rank 0 waits in a collective.

Without the failure protocol rank 0 would sit in the broadcast until the collective
timeout; with it, both ranks exit within seconds and rank 0 prints rank 1's message.

usage: torchrun --standalone --nproc_per_node 2 distributed_failure_worker.py
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from wanrt.distributed.launch import RankContext, run_rank

MESSAGE = "injected failure: the low-noise expert ran out of memory"


def main(context: RankContext) -> None:
    dist.barrier()  # both ranks are up before rank 1 fails
    if context.rank == 1:
        raise RuntimeError(MESSAGE)
    box = [None]
    dist.broadcast_object_list(box, src=1)  # rank 1 never sends


if __name__ == "__main__":
    run_rank(main, torch.device("cpu"))
