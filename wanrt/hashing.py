"""SHA-256 of checkpoint files, memoised on disk so a 28 GB checkpoint is hashed once.

A memo entry is keyed by (absolute path, size, mtime_ns, inode, ctime_ns): replacing or
editing a file changes one of them, even an in-place edit whose mtime is set back (`touch
-d`, `os.utime`: the kernel updates ctime on both the write and the time change, and no
user can set ctime), so a stale digest is never reused. Each entry is its own small
file, so concurrent runs (torchrun ranks, two shells) never race on a shared index.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from torch import Tensor

from wanrt.loading.save import write_atomic

CACHE_DIR_ENV = "WANRT_CACHE_DIR"
_CHUNK_BYTES = 8 * 2**20
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


def cache_root() -> Path:
    """The wanrt cache folder (hash memo, prompt embeddings, demo checkpoints):
    `$WANRT_CACHE_DIR`, else `~/.cache/wanrt`."""
    configured = os.environ.get(CACHE_DIR_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "wanrt"


def _memo_path(path: Path, memo_dir: Path) -> Path:
    stat = path.stat()
    key = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ino}\0{stat.st_ctime_ns}"
    return memo_dir / f"{hashlib.sha256(key.encode()).hexdigest()}.sha256"


def file_sha256(path: Path, memo_dir: Path | None = None) -> str:
    """Hex SHA-256 of a file's bytes, read from the memo when the file is unchanged."""
    path = Path(path)
    memo = _memo_path(path, memo_dir or cache_root() / "sha256")
    try:
        remembered = memo.read_text().strip()
        if _HEX_DIGEST.fullmatch(remembered):
            return remembered
    except OSError:
        pass
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    hex_digest = digest.hexdigest()
    try:
        write_atomic(memo, lambda tmp: tmp.write_text(hex_digest + "\n"))
    except OSError:
        pass  # an unwritable cache only costs speed; the digest itself is still right
    return hex_digest


def files_under(path: Path) -> list[Path]:
    """`path` itself if it is a file, else every file below it, in a stable order."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file())


def tree_sha256(path: Path, memo_dir: Path | None = None) -> str:
    """One digest for a file or a folder: over each file's relative name and content digest."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path, memo_dir)
    digest = hashlib.sha256()
    for file in files_under(path):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file, memo_dir)}\n".encode())
    return digest.hexdigest()


def tensor_sha256(tensor: Tensor) -> str:
    """Hex SHA-256 of a tensor's values as float32 (e.g. an image's pixels, to tell images apart)."""
    return hashlib.sha256(tensor.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
