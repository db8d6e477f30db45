"""Reading DiT blocks from the checkpoint file for every forward (host RAM mode stream-file).

When the host cannot hold even one expert, the streamed blocks are never loaded: their
parameters stay on the meta device (`wanrt.loading.checkpoint.load_dit(leave_in_file=...)`)
and the block streamer reads each one's bytes with `pread` when its turn comes, straight into
the device slot on a CPU device, or into a page-locked staging buffer that is then copied to
the GPU (no pageable copy in between). Tensors stored in another dtype than the one they run
in (official bf16 files, float32 modulation tables) are converted after the read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from wanrt.errors import CheckpointError
from wanrt.loading.files import TensorInfo


@dataclass(frozen=True)
class FileTensor:
    """One parameter of a streamed block: where it lives in the block's flat buffer and in
    the file."""

    buffer_offset: int
    shape: torch.Size
    dtype: torch.dtype          # the dtype it runs in
    source: TensorInfo          # file, offset, stored shape and dtype

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize


class FileReader:
    """Positional reads from checkpoint files, one open descriptor per file."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self.bytes_read = 0

    def read(self, source: TensorInfo, into: Tensor) -> None:
        """Fill the contiguous CPU tensor `into` (stored dtype and size) with the tensor's bytes."""
        fd = self._fds.get(source.path)
        if fd is None:
            fd = self._fds[source.path] = os.open(source.path, os.O_RDONLY)
        view = memoryview(into.view(torch.uint8).numpy()).cast("B")
        done = 0
        while done < source.nbytes:
            count = os.preadv(fd, [view[done:]], source.offset + done)
            if count == 0:
                raise CheckpointError(f"{source.path}: ended while streaming a block; the file changed "
                                      "or is truncated")
            done += count
        self.bytes_read += source.nbytes

    def read_block(self, tensors: list[FileTensor], buffer: Tensor) -> None:
        """Every tensor of a block into its place in the flat uint8 host `buffer`."""
        for tensor in tensors:
            place = buffer[tensor.buffer_offset:tensor.buffer_offset + tensor.nbytes]
            if tensor.source.dtype == tensor.dtype:
                self.read(tensor.source, place)
            else:
                stored = torch.empty(tensor.source.shape, dtype=tensor.source.dtype)
                self.read(tensor.source, stored)
                place.view(tensor.dtype).copy_(stored.view(-1))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
