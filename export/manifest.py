"""Artifact directories: a manifest that carries each compiled artifact's identity, checked
before anything is deserialized, and a store that builds atomically under a lock and keeps
a cache directory within a size cap (least recently used artifacts go first).

Compiled engines and `.pt2` packages are executable code, so loading is strict: the manifest
must name this wanrt, torch and backend version, this GPU architecture, this precision and
these source weights (`StaleArtifactError`: rebuild), and every file listed must hash to the
recorded sha256 (`TamperedArtifactError`: refused, never rebuilt over). The manifest is read
as JSON only. It does not defend against someone who can rewrite both a file and the
manifest: the cache directory must be as private as the Python environment itself.

Layout: `<root>/<component>-<slot>-<profile>/` holds `manifest.json` and the artifact files.
The slot hashes what a run asks for (component, backend, precision, device, weights); the
versions are not part of it, so upgrading torch rebuilds a slot in place instead of leaving
the old artifact behind. A slot may hold several shape profiles.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import Tensor, nn

import wanrt
from wanrt.errors import WanrtError
from wanrt.interrupts import process_alive
from wanrt.export.specs import ShapeProfile
from wanrt.loading.save import write_json

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
LAST_USED_FILE = ".last_used"
LOCK_DIR = ".locks"
BUILD_PREFIX = ".build-"
_READ_BYTES = 8 * 2**20
# Less free space than this after a failed build: the disk filled up during it.
_NEARLY_FULL_BYTES = 16 * 2**20


class ArtifactError(WanrtError):
    """An artifact cannot be used; the message says why and what to do."""


class MissingArtifactError(ArtifactError):
    """No artifact in the directory matches this run."""


class StaleArtifactError(ArtifactError):
    """The artifact was built for another environment, precision or weights: rebuild it."""


class TamperedArtifactError(ArtifactError):
    """A file differs from what its manifest recorded: refused, nothing was deserialized."""


class ArtifactBuildError(ArtifactError):
    """A build could not be written (the disk is full or too small for it)."""


def device_arch(device: torch.device | str) -> str:
    """"sm_90" for an H100, "cpu" on the host: what compiled GPU code is specific to."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm_{major}{minor}"
    return device.type


def tensors_sha256(tensors: Mapping[str, Tensor] | nn.Module) -> str:
    """One digest over names, dtypes, shapes and bytes: the weights an artifact bakes in."""
    if isinstance(tensors, nn.Module):
        tensors = tensors.state_dict()
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        tensor = tensor.detach()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def interface_sha256(tensors: Mapping[str, Tensor]) -> str:
    """Digest of names, dtypes and shapes only: for artifacts that take their weights as inputs."""
    text = "".join(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n" for name, t in tensors.items())
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """Always read in full: a memo keyed by mtime would let a touched-up file through."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_READ_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Identity:
    """Everything an artifact must match to be loaded."""

    component: str
    backend: str
    backend_version: str
    precision: str        # weight scheme and compute dtype, e.g. "fp8/bfloat16"
    device_arch: str      # "sm_90", "cpu"
    weights_sha256: str   # the baked-in weights, or the weight-input interface (DIT_BLOCK)
    wanrt_version: str = wanrt.__version__
    torch_version: str = torch.__version__

    # Fields a run selects by; the rest describe the environment and only make it stale.
    _SLOT_FIELDS = ("component", "backend", "precision", "device_arch", "weights_sha256")

    def slot(self) -> str:
        key = "\0".join(getattr(self, name) for name in self._SLOT_FIELDS)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def differences(self, other: "Identity") -> list[str]:
        return [f"{f.name} {getattr(other, f.name)!r} (this run needs {getattr(self, f.name)!r})"
                for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


@dataclass(frozen=True)
class Manifest:
    identity: Identity
    profiles: tuple[ShapeProfile, ...]
    files: Mapping[str, str]      # file name (relative) -> sha256
    dynamic: bool                 # False: one static graph per profile shape (see notes)
    notes: str = ""

    def covers(self, wanted: ShapeProfile | None) -> bool:
        """Whether one of the built profiles holds the wanted profile's whole range."""
        if wanted is None:
            return True
        ends = [{name: triple[i] for name, triple in wanted.shapes.items()} for i in (0, 2)]
        return any(all(p.covers(end) for end in ends) for p in self.profiles)

    def to_json(self) -> dict:
        return {"format": MANIFEST_FORMAT, "identity": asdict(self.identity),
                "profiles": [p.to_json() for p in self.profiles], "files": dict(self.files),
                "dynamic": self.dynamic, "notes": self.notes}

    @classmethod
    def from_json(cls, raw: Mapping) -> "Manifest":
        if raw.get("format") != MANIFEST_FORMAT:
            raise StaleArtifactError(f"manifest format {raw.get('format')!r}, this wanrt reads {MANIFEST_FORMAT}")
        return cls(Identity(**raw["identity"]), tuple(ShapeProfile.from_json(p) for p in raw["profiles"]),
                   dict(raw["files"]), bool(raw["dynamic"]), raw.get("notes", ""))


def read_manifest(directory: Path) -> Manifest:
    path = Path(directory) / MANIFEST_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise MissingArtifactError(f"{directory}: no {MANIFEST_FILE}") from None
    except (OSError, ValueError) as error:
        raise TamperedArtifactError(f"{path}: unreadable manifest ({error}); delete the folder") from None
    try:
        return Manifest.from_json(raw)
    except (KeyError, TypeError) as error:
        raise TamperedArtifactError(f"{path}: malformed manifest ({error}); delete the folder") from None


def verify(directory: Path, expected: Identity) -> Manifest:
    """The manifest of `directory` once identity and every file's bytes check out.

    Call before deserializing anything from the folder: this reads only JSON and hashes.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    differences = expected.differences(manifest.identity)
    if differences:
        raise StaleArtifactError(f"{directory} was built for another setup: {'; '.join(differences)}")
    for name in manifest.files:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise TamperedArtifactError(f"{directory}: manifest names a file outside the folder ({name})")
    # Every file the folder holds must be listed and hashed: an empty or partial `files`
    # map would otherwise let an unverified file through to the deserializer.
    present = {path.relative_to(directory).as_posix() for path in directory.rglob("*")
               if path.is_file() and path.name not in (MANIFEST_FILE, LAST_USED_FILE)}
    unlisted = sorted(present - set(manifest.files))
    if not manifest.files or unlisted:
        what = "its manifest lists no file" if not manifest.files else f"{', '.join(unlisted)} is not in its manifest"
        raise TamperedArtifactError(f"{directory}: {what}; refusing to load it. Delete {directory} and rebuild")
    for name, recorded in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise TamperedArtifactError(f"{path} is missing; delete {directory} and rebuild")
        if file_sha256(path) != recorded:
            raise TamperedArtifactError(f"{path} does not match its manifest (sha256 differs); refusing "
                                        f"to load it. Delete {directory} and rebuild")
    return manifest


def write_artifact_manifest(directory: Path, identity: Identity, profiles: Sequence[ShapeProfile],
                            files: Sequence[str], dynamic: bool, notes: str = "") -> Manifest:
    manifest = Manifest(identity, tuple(profiles), {name: file_sha256(Path(directory) / name) for name in files},
                        dynamic, notes)
    write_json(Path(directory) / MANIFEST_FILE, manifest.to_json())
    return manifest


@dataclass(frozen=True)
class BuiltFiles:
    """What a builder wrote into its (temporary) folder."""

    files: tuple[str, ...]
    dynamic: bool
    notes: str = ""


Builder = Callable[[Path], BuiltFiles]


def _dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


class ArtifactStore:
    """A folder of artifact directories.

    `build=True` (the cache): a missing or stale artifact is built, under a per-slot lock
    so that concurrent runs build it once, then the least recently used artifacts are
    evicted down to `max_bytes`. `build=False` (a folder `wanrt export` wrote): a missing
    or stale artifact is an error naming the command that rebuilds it.
    """

    def __init__(self, root: Path, build: bool = True, max_bytes: int | None = None,
                 rebuild_hint: str = "rebuild it with `wanrt export`") -> None:
        self.root = Path(root)
        self.build = build
        self.max_bytes = max_bytes
        self.rebuild_hint = rebuild_hint

    def _artifact_dirs(self, identity: Identity) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(self.root.glob(f"{identity.component}-{identity.slot()}-*"))

    @contextlib.contextmanager
    def _slot_lock(self, identity: Identity, blocking: bool = True) -> Iterator[bool]:
        """flock on a per-slot file: held while a slot is checked, built or evicted."""
        lock_dir = self.root / LOCK_DIR
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / f"{identity.component}-{identity.slot()}.lock", "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def find(self, identity: Identity, wanted: ShapeProfile | None = None) -> tuple[Path, Manifest]:
        """The verified artifact whose profile holds the `wanted` range (any, when None).

        Raises MissingArtifactError, StaleArtifactError or TamperedArtifactError."""
        stale: StaleArtifactError | None = None
        for directory in self._artifact_dirs(identity):
            try:
                candidate = read_manifest(directory)
            except MissingArtifactError:
                continue  # a folder without manifest is not an artifact (never published)
            if not candidate.covers(wanted):
                continue
            try:
                manifest = verify(directory, identity)
            except StaleArtifactError as error:
                stale = error
                continue
            _touch(directory)
            return directory, manifest
        if stale is not None:
            raise StaleArtifactError(f"{stale}; {self.rebuild_hint}")
        shapes = f" for {wanted.name}" if wanted is not None else ""
        raise MissingArtifactError(f"{self.root} has no {identity.backend} {identity.component} artifact "
                                   f"({identity.precision}, {identity.device_arch}){shapes}; {self.rebuild_hint}")

    def get(self, identity: Identity, profile: ShapeProfile, build: Builder,
            expected_bytes: int = 0) -> tuple[Path, Manifest]:
        """`find`, else (when this store builds) build `profile` with `build(tmp_dir)`,
        after checking the disk has `expected_bytes` free for it.

        A second process asking for the same slot meanwhile waits on the lock and then finds
        the finished artifact. A tampered artifact is never rebuilt over: that is refused."""
        if not self.build:
            return self.find(identity, profile)
        self.root.mkdir(parents=True, exist_ok=True)
        self.sweep()
        with self._slot_lock(identity):
            try:
                return self.find(identity, profile)
            except (MissingArtifactError, StaleArtifactError):
                pass
            self._check_free_space(identity, expected_bytes)
            directory = self._publish(identity, profile, build, expected_bytes)
        self.evict(keep=directory)
        return directory, read_manifest(directory)

    def _check_free_space(self, identity: Identity, expected_bytes: int) -> None:
        # A full disk inside torch's package writer aborts the process (SIGABRT), past any
        # handler: refuse before building instead.
        free = shutil.disk_usage(self.root).free
        if free < expected_bytes:
            raise ArtifactBuildError(
                f"building the {identity.backend} {identity.component} artifact needs about "
                f"{expected_bytes / 2**30:.2f} GiB in {self.root} but {free / 2**30:.2f} GiB are free; free "
                f"space there, lower --engine-cache-gib, or set $WANRT_CACHE_DIR to a larger disk")

    def sweep(self) -> list[Path]:
        """Remove the temporary folders of builds whose process is gone (killed mid-build)."""
        swept = []
        for folder in self.root.glob(f"{BUILD_PREFIX}*"):
            owner = folder.name.removeprefix(BUILD_PREFIX).split("-", 1)[0]
            if folder.is_dir() and not (owner.isdigit() and process_alive(int(owner))):
                shutil.rmtree(folder, ignore_errors=True)
                swept.append(folder)
        return swept

    def _publish(self, identity: Identity, profile: ShapeProfile, build: Builder, expected_bytes: int = 0) -> Path:
        """Build into a temporary folder, write the manifest, move it into place."""
        profile_key = hashlib.sha256(json.dumps(profile.to_json(), sort_keys=True).encode()).hexdigest()[:8]
        directory = self.root / f"{identity.component}-{identity.slot()}-{profile_key}"
        # The builder's pid in the name tells `sweep` whether the build is still running.
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f"{BUILD_PREFIX}{os.getpid()}-"))
        try:
            built = self._build(build, tmp, identity)
            write_artifact_manifest(tmp, identity, (profile,), built.files, built.dynamic, built.notes)
            _touch(tmp)
            if directory.exists():  # stale: moved aside, then dropped once the new one is in
                old = Path(tempfile.mkdtemp(dir=self.root, prefix=f"{BUILD_PREFIX}{os.getpid()}-"))
                os.replace(directory, old / directory.name)
                os.replace(tmp, directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    def _build(self, build: Builder, tmp: Path, identity: Identity) -> BuiltFiles:
        """`build(tmp)`, a full disk turned into one line (the caller removes `tmp`)."""
        try:
            return build(tmp)
        except (OSError, RuntimeError) as error:
            # torch's package writer reports a full disk as a RuntimeError ("file write failed").
            disk_full = (getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
                         or shutil.disk_usage(self.root).free < _NEARLY_FULL_BYTES)
            if not disk_full:
                raise
            raise ArtifactBuildError(f"building the {identity.backend} {identity.component} artifact ran out of "
                                     f"disk space in {self.root}; free space there or set $WANRT_CACHE_DIR to a "
                                     "larger disk") from None

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Remove least recently used artifacts until the folder is within `max_bytes`.

        An artifact whose slot another process holds locked (building or checking it) is
        skipped; the one just built or used (`keep`) always stays."""
        if self.max_bytes is None or not self.root.is_dir():
            return []
        artifacts = [d for d in self.root.iterdir() if d.is_dir() and (d / MANIFEST_FILE).is_file()]
        sizes = {d: _dir_bytes(d) for d in artifacts}
        total = sum(sizes.values())
        removed = []
        for directory in sorted(artifacts, key=_last_used):
            if total <= self.max_bytes:
                break
            if keep is not None and directory.resolve() == Path(keep).resolve():
                continue
            try:
                identity = read_manifest(directory).identity
            except ArtifactError:
                identity = None
            lock = self._slot_lock(identity) if identity is not None else contextlib.nullcontext(True)
            with lock as locked:
                if not locked:
                    continue
                shutil.rmtree(directory, ignore_errors=True)
            total -= sizes[directory]
            removed.append(directory)
        return removed


def _touch(directory: Path) -> None:
    """Record a use (LRU order); the stamp is not an artifact file, so it is not hashed."""
    (Path(directory) / LAST_USED_FILE).touch()


def _last_used(directory: Path) -> int:
    stamp = directory / LAST_USED_FILE
    return (stamp if stamp.exists() else directory / MANIFEST_FILE).stat().st_mtime_ns
