"""Run a model's repeated blocks from host memory through a few device buffers.

`BlockStreamer` is a transform applied to built models from outside: each streamed block's
tensors are packed into one flat host buffer (pinned when the host allows), and the device
holds only `depth + 1` block-sized slots. While block i computes on the current stream, the
next `depth` blocks of the execution order are copied into free slots on a side stream;
CUDA events order the two streams (a slot is refilled only after the block that used it has
finished, and a block runs only after its copy has landed). Nothing is allocated in the hot
loop: the slots are allocated once and blocks are re-pointed at them (`param.data = view`).

The execution order is given, not guessed: `expect(sequence)` lists the (model, block)
pairs the next forwards will run, so prefetching crosses forward and MoE-expert boundaries
(the incoming expert's first blocks are copied while the outgoing one finishes), and an
expert that never appears in the order is never copied.

On a CPU device the same bookkeeping runs with synchronous copies, which is what the
equivalence tests exercise.
"""

from __future__ import annotations

from collections import deque
from itertools import islice
from dataclasses import dataclass
from typing import Hashable, Iterable

import torch
from torch import Tensor, nn

from wanrt.loading.files import TensorInfo
from wanrt.runtime.file_blocks import FileReader, FileTensor

# Tensor views inside a slot start at multiples of this, so kernels see the same alignment
# as for freshly allocated tensors (some CPU kernels pick their path by alignment).
ALIGNMENT = 256


def _aligned(offset: int) -> int:
    return (offset + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


@dataclass(frozen=True)
class _TensorSlot:
    module: nn.Module
    name: str
    offset: int
    shape: torch.Size
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize


def block_layout(block: nn.Module) -> tuple[list[_TensorSlot], int]:
    """Where each parameter/buffer of `block` lives in its flat byte buffer, and the size."""
    layout, offset = [], 0
    for module in block.modules():
        tensors = [*module._parameters.items(), *module._buffers.items()]
        for name, tensor in tensors:
            if tensor is None:
                continue
            layout.append(_TensorSlot(module, name, offset, tensor.shape, tensor.dtype))
            offset = _aligned(offset + tensor.numel() * tensor.element_size())
    return layout, offset


def _view(buffer: Tensor, entry: _TensorSlot) -> Tensor:
    return buffer[entry.offset:entry.offset + entry.nbytes].view(entry.dtype).view(entry.shape)


def _bind(layout: list[_TensorSlot], buffer: Tensor) -> None:
    """Point every tensor of a block at its place in `buffer` (no copy)."""
    for entry in layout:
        getattr(entry.module, entry.name).data = _view(buffer, entry)


def _bind_placeholder(layout: list[_TensorSlot]) -> None:
    """Point every tensor of a file-backed block at one zero element between its turns, so
    the block holds no weights. Tensors still on the meta device (as loaded) are replaced:
    a meta tensor cannot be re-pointed at real memory."""
    for entry in layout:
        placeholder = torch.zeros((), dtype=entry.dtype).expand(entry.shape)
        tensor = getattr(entry.module, entry.name)
        if not tensor.is_meta:
            tensor.data = placeholder
        elif entry.name in entry.module._parameters:
            entry.module._parameters[entry.name] = nn.Parameter(placeholder, requires_grad=False)
        else:
            entry.module._buffers[entry.name] = placeholder


class _StreamedBlock:
    def __init__(self, key: Hashable, block: nn.Module, layout: list[_TensorSlot], nbytes: int,
                 pin: bool, file_tensors: list[FileTensor] | None = None) -> None:
        self.key = key
        self.layout, self.nbytes = layout, nbytes
        # A file-backed block has no host copy: it is read from the checkpoint every turn.
        self.file_tensors = file_tensors
        self.pinned = pin and file_tensors is None
        self.host: Tensor | None = None
        if file_tensors is not None:
            _bind_placeholder(layout)
            return
        host = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=pin)
        for entry in self.layout:
            _view(host, entry).copy_(getattr(entry.module, entry.name).detach())
        _bind(self.layout, host)
        self.host = host


def _file_layout(block: nn.Module, prefix: str, layout: list[_TensorSlot],
                 file_tensors: dict[str, TensorInfo]) -> list[FileTensor]:
    """Where each tensor of `block` (named under `prefix`) is in the file and in the buffer."""
    names = {id(module): name for name, module in block.named_modules()}
    placed = []
    for entry in layout:
        name = ".".join(part for part in (prefix, names[id(entry.module)], entry.name) if part)
        placed.append(FileTensor(entry.offset, entry.shape, entry.dtype, file_tensors[name]))
    return placed


class BlockStreamer:
    """Streams the registered blocks of one or more models through `depth + 1` device slots.

    `register(key, model)` takes over `model.<repeated_blocks>` except the first
    `resident_blocks`, which the caller places (on the device while that model is active:
    see `move_resident`). Block keys are `(key, index)`.
    """

    def __init__(self, device: torch.device | str, depth: int = 2, pin: bool | None = None,
                 pin_limit_bytes: int | None = None) -> None:
        """`pin_limit_bytes` caps page-locked host memory (the planner's partial pinning):
        blocks past it stay in pageable memory, whose copies are slower and synchronous."""
        if depth < 1:
            raise ValueError("prefetch depth must be at least 1")
        self.device = torch.device(device)
        self.depth = depth
        self.pin = self.device.type == "cuda" if pin is None else pin
        self.pin_limit_bytes = pin_limit_bytes
        self.pinned_bytes = 0
        self._blocks: dict[tuple[Hashable, int], _StreamedBlock] = {}
        self._resident: dict[Hashable, list[nn.Module]] = {}
        self._resident_tensors: dict[Hashable, list[Tensor]] = {}
        self._hooks: dict[Hashable, list[torch.utils.hooks.RemovableHandle]] = {}
        self._slots: list[Tensor] = []
        self._slot_free: list[torch.cuda.Event | None] = []
        self._loaded: dict[tuple[Hashable, int], int] = {}       # block -> slot holding it
        self._copied: dict[tuple[Hashable, int], torch.cuda.Event | None] = {}
        self._order: deque[tuple[Hashable, int]] = deque()
        cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None
        # File-backed blocks: the reader, and per slot a page-locked staging buffer whose
        # last copy to the device must finish before it is refilled.
        self._reader = FileReader()
        self._staging: dict[int, Tensor] = {}
        self._staging_done: dict[int, torch.cuda.Event] = {}
        self.bytes_copied = 0

    # ------------------------------------------------------------------ setup

    def register(self, key: Hashable, model: nn.Module, resident_blocks: int = 0,
                 file_tensors: dict[str, TensorInfo] | None = None) -> None:
        """Stream `model`'s repeated blocks; the rest (`move_resident`) is the caller's to place.

        With `file_tensors` (parameter name -> where it is stored), blocks whose parameters
        were left on the meta device are read from the checkpoint file on every turn."""
        blocks_name = getattr(model, "repeated_blocks", "blocks")
        resident = [child for name, child in model.named_children() if name != blocks_name]
        self._resident[key] = resident + list(getattr(model, blocks_name)[:resident_blocks])
        self._resident_tensors[key] = [*model._parameters.values(), *model._buffers.values()]
        for index, block in enumerate(getattr(model, blocks_name)):
            if index < resident_blocks:
                continue
            layout, nbytes = block_layout(block)
            from_file = None
            if file_tensors is not None and any(p.is_meta for p in block.parameters()):
                from_file = _file_layout(block, f"{blocks_name}.{index}", layout, file_tensors)
            pin = from_file is None and self._pin_next(nbytes)
            streamed = _StreamedBlock((key, index), block, layout, nbytes, pin, from_file)
            self._blocks[streamed.key] = streamed
            self._hooks.setdefault(key, []).extend([
                block.register_forward_pre_hook(lambda _m, _a, k=streamed.key: self._before(k)),
                block.register_forward_hook(lambda _m, _a, _o, k=streamed.key: self._after(k))])
        if self._slots and self.slot_bytes < max(b.nbytes for b in self._blocks.values()):
            self.release()

    def unregister(self, key: Hashable) -> None:
        """Forget model `key` (an expert whose phase is over): its host block buffers, pinned
        ones included, are no longer referenced from here, so dropping the model frees them."""
        self.release()
        for handle in self._hooks.pop(key, []):
            handle.remove()
        for block_key in [k for k in self._blocks if k[0] == key]:
            block = self._blocks.pop(block_key)
            if block.pinned:
                self.pinned_bytes -= block.nbytes
        self._resident.pop(key, None)
        self._resident_tensors.pop(key, None)

    def move_resident(self, key: Hashable, device: torch.device | str) -> None:
        """Move what of model `key` is not streamed: its small modules and resident blocks
        (the MoE expert swap, and clearing the device before the VAE decode)."""
        for module in self._resident.get(key, []):
            module.to(device)
        for tensor in self._resident_tensors.get(key, []):
            tensor.data = tensor.data.to(device)

    def _staging_for(self, slot: int) -> Tensor:
        if slot not in self._staging:
            self._staging[slot] = torch.empty(self.slot_bytes, dtype=torch.uint8, pin_memory=True)
        elif slot in self._staging_done:
            self._staging_done.pop(slot).synchronize()
        return self._staging[slot]

    def _pin_next(self, nbytes: int) -> bool:
        if not self.pin or (self.pin_limit_bytes is not None
                            and self.pinned_bytes + nbytes > self.pin_limit_bytes):
            return False
        self.pinned_bytes += nbytes
        return True

    def release(self) -> None:
        """Free the device slots between forwards (e.g. before the VAE decode), dropping any
        prefetched blocks and the announced order; the next forward reallocates them."""
        if self._copy_stream is not None:
            self._copy_stream.synchronize()
        self._slots, self._slot_free = [], []
        self._staging.clear()
        self._staging_done.clear()
        self._loaded.clear()
        self._copied.clear()
        self._order.clear()

    def _ensure_slots(self) -> None:
        if not self._slots and self._blocks:
            slot_bytes = max(b.nbytes for b in self._blocks.values())
            self._slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=self.device)
                           for _ in range(self.depth + 1)]
            self._slot_free = [None] * len(self._slots)

    def streamed_blocks(self, key: Hashable) -> list[int]:
        return [index for (k, index) in self._blocks if k == key]

    @property
    def slot_bytes(self) -> int:
        return self._slots[0].numel() if self._slots else 0

    # ------------------------------------------------------------------ schedule

    def expect(self, sequence: Iterable[tuple[Hashable, int]]) -> None:
        """Append the streamed blocks that the coming forwards will run, in order."""
        self._order.extend(key for key in sequence if key in self._blocks)
        self._prefetch()

    def expect_forward(self, key: Hashable) -> None:
        """The next forward runs every block of model `key` once."""
        self.expect((key, index) for index in self.streamed_blocks(key))

    def _upcoming(self) -> list[tuple[Hashable, int]]:
        """The next `depth + 1` blocks of the order (a whole run's order can be thousands)."""
        return list(islice(self._order, self.depth + 1))

    def _prefetch(self) -> None:
        """Start copies for the next `depth + 1` blocks in the order that are not loaded."""
        self._ensure_slots()
        for key in self._upcoming():
            if key not in self._loaded:
                slot = self._free_slot()
                if slot is None:
                    return
                self._start_copy(key, slot)

    def _free_slot(self) -> int | None:
        busy = set(self._loaded.values())
        needed = set(self._upcoming())
        for slot in range(len(self._slots)):
            if slot not in busy:
                return slot
        # Evict a loaded block that is not among the next ones to run.
        for key, slot in list(self._loaded.items()):
            if key not in needed:
                del self._loaded[key]
                return slot
        return None

    def _start_copy(self, key: tuple[Hashable, int], slot: int) -> None:
        block = self._blocks[key]
        target = self._slots[slot][:block.nbytes]
        source = block.host
        if source is None and self._copy_stream is None:
            # A CPU device: the file's bytes go straight into the slot.
            self._reader.read_block(block.file_tensors, target)
        elif source is None:
            source = self._staging_for(slot)[:block.nbytes]
            self._reader.read_block(block.file_tensors, source)
        if self._copy_stream is None:
            if block.host is not None:
                target.copy_(source)
            self._copied[key] = None
        else:
            with torch.cuda.stream(self._copy_stream):
                # The slot's previous user must have finished computing before we overwrite it.
                if self._slot_free[slot] is not None:
                    self._copy_stream.wait_event(self._slot_free[slot])
                target.copy_(source, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._copy_stream)
            self._copied[key] = event
            if block.host is None:
                self._staging_done[slot] = event
        self._loaded[key] = slot
        self.bytes_copied += block.nbytes

    # ------------------------------------------------------------------ hooks

    def _before(self, key: tuple[Hashable, int]) -> None:
        if not self._order or self._order[0] != key:
            # Not announced (or announced out of order): run it anyway, correctly, and
            # realign the order so the prefetch stays useful.
            if key in self._order:
                while self._order[0] != key:
                    self._order.popleft()
            else:
                self._order.appendleft(key)
        # `key` heads the order, so this loads it if no earlier prefetch did.
        self._prefetch()
        slot = self._loaded[key]
        event = self._copied.get(key)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        _bind(self._blocks[key].layout, self._slots[slot])

    def _after(self, key: tuple[Hashable, int]) -> None:
        self._order.popleft()
        slot = self._loaded.pop(key)
        if self._copy_stream is not None:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            self._slot_free[slot] = done
        # The block points at host memory (or nothing) again until its next turn, so nothing
        # stale is ever read through it.
        block = self._blocks[key]
        if block.host is None:
            _bind_placeholder(block.layout)
        else:
            _bind(block.layout, block.host)
        self._prefetch()
