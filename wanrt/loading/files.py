"""Reading checkpoint files safely: safetensors (single or sharded) and weights-only .pth.

Every failure is a `CheckpointError` naming the file and what to do. Headers are read and
checked before any tensor data, so a truncated download or a git-lfs pointer is reported
as such instead of surfacing as a deep parse error.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import torch
from torch import Tensor

from wanrt.errors import CheckpointError

LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def check_not_lfs_pointer(path: Path) -> None:
    with open(path, "rb") as fh:
        head = fh.read(len(LFS_POINTER_PREFIX))
    if head == LFS_POINTER_PREFIX:
        raise CheckpointError(
            f"{path}: this is a git-lfs pointer, not the weights; run `git lfs pull` in the "
            "checkpoint folder or download the file itself")


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found; check --ckpt-dir")
    check_not_lfs_pointer(path)
    return path


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie in a safetensors file (absolute offsets)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    begin: int
    end: int

    @property
    def info(self) -> TensorInfo:
        return TensorInfo(self.shape, self.dtype)


@dataclass(frozen=True)
class SafetensorsLayout:
    """A safetensors header: every tensor's place, and the `__metadata__` strings."""

    tensors: dict[str, StoredTensor]
    metadata: dict[str, str]


def read_safetensors_layout(path: Path) -> SafetensorsLayout:
    """The header, after checking the file holds all the data it announces."""
    path = Path(path)
    require_file(path, "safetensors file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes); download it again")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors header; download it again")
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header; download it again") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header; download it again")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    data_end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if data_start + data_end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file ({size} of {data_start + data_end} bytes); "
            "download it again")
    try:
        tensors = {key: StoredTensor(tuple(entry["shape"]), SAFETENSORS_DTYPES[entry["dtype"]],
                                     data_start + entry["data_offsets"][0], data_start + entry["data_offsets"][1])
                   for key, entry in header.items()}
    except KeyError as exc:
        raise CheckpointError(f"{path}: unsupported safetensors dtype {exc}") from None
    return SafetensorsLayout(tensors, metadata)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Key -> shape/dtype from the header, after checking the file holds all its data."""
    return {key: stored.info for key, stored in read_safetensors_layout(path).tensors.items()}


def read_into(fh: BinaryIO, begin: int, out: Tensor, source: Path) -> Tensor:
    """Fill the contiguous CPU tensor `out` with the file's bytes at `begin`.

    The bytes go straight from the kernel into `out`'s storage (no mmap, no staging copy),
    so a file read this way occupies its own size in host memory once: memory-mapped
    pages would stay resident (and count in RSS) until the whole shard had been copied.
    """
    nbytes = out.numel() * out.element_size()
    if nbytes == 0:
        return out
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    fh.seek(begin)
    filled = 0
    while filled < nbytes:
        count = fh.readinto(view[filled:])
        if not count:
            raise CheckpointError(f"{source}: truncated file (ends inside a tensor); download it again")
        filled += count
    return out


def read_stored(fh: BinaryIO, stored: StoredTensor, source: Path) -> Tensor:
    """One tensor of a safetensors file, read into a fresh buffer of its own."""
    out = torch.empty(stored.shape, dtype=stored.dtype)
    if stored.end - stored.begin != out.numel() * out.element_size():
        raise CheckpointError(f"{source}: corrupt safetensors header (a tensor's byte range does not "
                              "match its shape); download it again")
    return read_into(fh, stored.begin, out, source)


def iter_safetensors(path: Path, keys: list[str] | None = None) -> Iterator[tuple[str, Tensor]]:
    """Yield tensors one at a time, each read into its own buffer (see `read_into`)."""
    layout = read_safetensors_layout(path)
    with open(path, "rb", buffering=0) as fh:
        for key in keys if keys is not None else layout.tensors:
            yield key, read_stored(fh, layout.tensors[key], path)


def safetensors_shards(folder: Path, stem: str) -> list[Path]:
    """The files of `<stem>.safetensors`, or of the shards listed in `<stem>.safetensors.index.json`."""
    index_path = folder / f"{stem}.safetensors.index.json"
    single = folder / f"{stem}.safetensors"
    if index_path.is_file():
        check_not_lfs_pointer(index_path)
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
            raise CheckpointError(f"{index_path}: not a valid safetensors index (no weight_map)") from None
        shards = [folder / name for name in dict.fromkeys(weight_map.values())]
        for shard in shards:
            require_file(shard, f"shard listed in {index_path.name}")
        return shards
    if single.is_file():
        return [require_file(single, "weights")]
    raise CheckpointError(f"{folder}: no {single.name} and no {index_path.name}; is this a model folder?")


def load_pth(path: Path, wrapper_key: str | None = None) -> dict[str, Tensor]:
    """A `.pth` state dict through the weights-only unpickler, memory-mapped. With
    `wrapper_key`, a file saved as `{wrapper_key: state_dict}` (training checkpoints such
    as the Animate relighting LoRA) gives the inner state dict.

    Full pickle can run arbitrary code on load; weights_only refuses any global that is not
    a tensor type, so a malicious `__reduce__` is rejected before it runs.
    """
    require_file(path, "checkpoint")
    with open(path, "rb") as fh:
        is_zip_archive = fh.read(2) == b"PK"
    # torch.save writes a zip archive (memory-mappable); a cut-off download loses its
    # central directory. Legacy (pre-1.6) files are a bare pickle and cannot be mmapped.
    if is_zip_archive and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint; download it again")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip_archive)
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: refused to load: the file contains pickled objects other than tensors "
            f"({first_line}); only plain state dicts are accepted") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: truncated or corrupt checkpoint ({type(exc).__name__}); download it again") from None
    if wrapper_key is not None and isinstance(state, dict) and set(state) == {wrapper_key}:
        state = state[wrapper_key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return state
