"""Reading checkpoint files safely: safetensors (single or sharded) and weights-only .pth.

Every failure is a `CheckpointError` naming the file and what to do. Headers are read and
checked before any tensor data, so a truncated download or a git-lfs pointer is reported
as such instead of surfacing as a deep parse error.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Mapping

import torch
from torch import Tensor

from wanrt.errors import CheckpointError, InputError, WanrtError

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
    # Where the bytes are (safetensors headers): the file and the absolute offset of the data.
    path: Path | None = None
    offset: int | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


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


# safetensors' own bound on the JSON header; a longer one is refused before it is read.
MAX_SAFETENSORS_HEADER_BYTES = 100_000_000


def read_safetensors_layout(path: Path) -> SafetensorsLayout:
    """The header, after checking that it is well formed (every entry's byte range matches
    its shape and dtype, no two overlap) and that the file holds all its data: whatever a
    corrupt or hostile file holds, the error is one line."""
    path = Path(path)
    require_file(path, "safetensors file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes); download it again")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, MAX_SAFETENSORS_HEADER_BYTES):
            raise CheckpointError(f"{path}: truncated or corrupt safetensors header; download it again")
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise CheckpointError(f"{path}: corrupt safetensors header; download it again") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object); download it again")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not an object); "
                              "download it again")
    data_start = 8 + header_len
    tensors, ranges = {}, []
    for key, entry in header.items():
        info, begin, end = _header_entry(path, key, entry)
        tensors[key] = StoredTensor(info.shape, info.dtype, data_start + begin, data_start + end)
        ranges.append((begin, end, key))
    ranges.sort()
    for (_, previous_end, previous), (begin, _, key) in zip(ranges, ranges[1:]):
        if begin < previous_end:
            raise CheckpointError(f"{path}: corrupt safetensors header (tensors {previous!r} and {key!r} "
                                  "overlap); download it again")
    data_end = max((end for _, end, _ in ranges), default=0)
    if data_start + data_end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file ({size} of {data_start + data_end} bytes); "
            "download it again")
    return SafetensorsLayout(tensors, metadata)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Key -> shape/dtype and where the bytes are, from the header, after the checks of
    `read_safetensors_layout`."""
    return {key: TensorInfo(stored.shape, stored.dtype, Path(path), stored.begin)
            for key, stored in read_safetensors_layout(path).tensors.items()}


def _header_entry(path: Path, key: str, entry: object) -> tuple[TensorInfo, int, int]:
    """One header entry as (shape/dtype, data begin, data end), checked for consistency."""
    def corrupt(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt safetensors header ({what} of {key!r}); download it again")
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise corrupt("no dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: unsupported safetensors dtype {dtype!r} of {key!r}")
    if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
        raise corrupt("bad shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise corrupt("bad data_offsets")
    torch_dtype = SAFETENSORS_DTYPES[dtype]
    if offsets[1] - offsets[0] != math.prod(shape) * torch_dtype.itemsize:
        raise corrupt(f"data_offsets {offsets} do not hold shape {shape} of {dtype}")
    return TensorInfo(tuple(shape), torch_dtype), offsets[0], offsets[1]


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
    """One tensor of a safetensors file, read into a fresh buffer of its own (the header
    checks guarantee its byte range matches its shape)."""
    return read_into(fh, stored.begin, torch.empty(stored.shape, dtype=stored.dtype), source)


def iter_safetensors(path: Path, keys: list[str] | None = None) -> Iterator[tuple[str, Tensor]]:
    """Yield tensors one at a time, each read into its own buffer (see `read_into`)."""
    layout = read_safetensors_layout(path)
    with open(path, "rb", buffering=0) as fh:
        for key in keys if keys is not None else layout.tensors:
            yield key, read_stored(fh, layout.tensors[key], path)


def safetensors_shards(folder: Path, stem: str) -> list[Path]:
    """The files of `<stem>.safetensors`, or of the shards listed in `<stem>.safetensors.index.json`.

    Shards an index names must lie inside `folder` (symlinks resolved): an absolute or
    `../` entry would load weights from anywhere on the machine.
    """
    index_path = folder / f"{stem}.safetensors.index.json"
    single = folder / f"{stem}.safetensors"
    if index_path.is_file():
        check_not_lfs_pointer(index_path)
        try:
            index = json.loads(index_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            index = None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
            raise CheckpointError(f"{index_path}: not a valid safetensors index (no weight_map of shard "
                                  "file names); download it again")
        shards = [confined_path(folder, name, index_path) for name in dict.fromkeys(weight_map.values())]
        for shard in shards:
            require_file(shard, f"shard listed in {index_path.name}")
        return shards
    if single.is_file():
        return [require_file(single, "weights")]
    raise CheckpointError(f"{folder}: no {single.name} and no {index_path.name}; is this a model folder?")


def confined_path(folder: Path, name: str, source: Path, error: type[WanrtError] = CheckpointError) -> Path:
    """`folder / name`, refused unless it resolves (symlinks included) inside `folder`:
    a file that lists other files (an index) must not lead anywhere else on the machine."""
    path = Path(folder) / name
    if Path(name).is_absolute() or not path.resolve().is_relative_to(Path(folder).resolve()):
        raise error(f"{source}: {name!r} points outside {folder}; only files inside the folder are read, "
                    f"fix or write {source.name} again")
    return path


def merge_unique(into: dict[str, object], found: Mapping[str, object], source: Path,
                 sources: dict[str, Path]) -> None:
    """Add `found` (read from `source`) to `into`, refusing a key already read from another
    file (`sources` remembers which): the last shard must not silently win."""
    for key, value in found.items():
        if key in sources:
            raise CheckpointError(f"{key!r} is in both {sources[key]} and {source}; a checkpoint holds each "
                                  "tensor once, re-download it")
        sources[key] = source
        into[key] = value


def check_pth_archive(path: Path) -> bool:
    """Refuse a missing, git-lfs pointer or cut-off `.pth` without reading its tensors;
    True when it is a (memory-mappable) zip archive."""
    require_file(path, "checkpoint")
    with open(path, "rb") as fh:
        is_zip_archive = fh.read(2) == b"PK"
    # torch.save writes a zip archive (memory-mappable); a cut-off download loses its
    # central directory. Legacy (pre-1.6) files are a bare pickle and cannot be mmapped.
    if is_zip_archive and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint; download it again")
    return is_zip_archive


def load_pth(path: Path, wrapper_key: str | None = None) -> dict[str, Tensor]:
    """A `.pth` state dict through the weights-only unpickler, memory-mapped. With
    `wrapper_key`, a file saved as `{wrapper_key: state_dict}` (training checkpoints such
    as the Animate relighting LoRA) gives the inner state dict.

    Full pickle can run arbitrary code on load; weights_only refuses any global that is not
    a tensor type, so a malicious `__reduce__` is rejected before it runs.
    """
    is_zip_archive = check_pth_archive(path)
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


def read_wanrt_safetensors(path: Path, file_format: str, what: str, fix: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every tensor and the metadata of a file wanrt wrote with metadata `format` =
    `file_format` (latents, sampling states); otherwise an InputError that starts with
    `what` (the file as the user named it) and ends with `fix`."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise InputError(f"{what} does not exist; {fix}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise InputError(f"{what} is not a readable safetensors file ({error}); {fix}") from None
    if metadata.get("format") != file_format:
        raise InputError(f"{what} was not written by wanrt (no {file_format} metadata); {fix}")
    return tensors, metadata
