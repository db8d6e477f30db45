"""Artifact manifests and the artifact store: identity checks before loading, tamper refusal,
atomic publication, one build under concurrent builders, LRU eviction under a size cap.

Builders here write plain bytes (no compilation), so the store's logic is what is tested;
tests/test_aoti.py runs the same store with real AOTInductor packages."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from wanrt.export.manifest import (MANIFEST_FILE, ArtifactStore, BuiltFiles, Identity, MissingArtifactError,
                                   StaleArtifactError, TamperedArtifactError, read_manifest, verify)
from wanrt.export.specs import ShapeProfile

IDENTITY = Identity(component="dit_block", backend="aoti", backend_version="2.13.0", precision="fp8/bfloat16",
                    device_arch="sm_90", weights_sha256="ab" * 32)
PROFILE = ShapeProfile("tokens=32..72", {"x": ((1, 32, 64), (1, 48, 64), (1, 72, 64))})


def _profile(low: int, high: int) -> ShapeProfile:
    return ShapeProfile(f"tokens={low}..{high}", {"x": ((1, low, 64), (1, low, 64), (1, high, 64))})


class CountingBuilder:
    """Writes `payload` as model.bin and counts its calls."""

    def __init__(self, payload: bytes = b"compiled code") -> None:
        self.payload = payload
        self.calls = 0

    def __call__(self, folder: Path) -> BuiltFiles:
        self.calls += 1
        (folder / "model.bin").write_bytes(self.payload)
        return BuiltFiles(("model.bin",), dynamic=True)


def test_a_built_artifact_is_found_and_verified(tmp_path):
    store = ArtifactStore(tmp_path)
    builder = CountingBuilder()
    directory, manifest = store.get(IDENTITY, PROFILE, builder)
    assert builder.calls == 1
    assert directory.parent == tmp_path and (directory / "model.bin").read_bytes() == b"compiled code"
    assert manifest.identity == IDENTITY and manifest.profiles == (PROFILE,)
    raw = json.loads((directory / MANIFEST_FILE).read_text())
    assert raw["identity"]["torch_version"] == IDENTITY.torch_version
    assert raw["files"]["model.bin"] == __import__("hashlib").sha256(b"compiled code").hexdigest()
    # A second request, and one for a sub-range of the profile, reuse it without building.
    assert store.get(IDENTITY, PROFILE, builder)[0] == directory
    assert store.get(IDENTITY, _profile(40, 60), builder)[0] == directory
    assert builder.calls == 1
    # A range the profile does not hold is another artifact in the same slot.
    wider, _ = store.get(IDENTITY, _profile(32, 100), builder)
    assert builder.calls == 2 and wider != directory


@pytest.mark.parametrize("field", ["torch_version", "wanrt_version", "backend_version", "device_arch",
                                   "precision", "weights_sha256"])
def test_any_identity_mismatch_is_refused_before_loading(tmp_path, field):
    directory, _ = ArtifactStore(tmp_path).get(IDENTITY, PROFILE, CountingBuilder())
    other = dataclasses.replace(IDENTITY, **{field: "something else"})
    with pytest.raises(StaleArtifactError, match=field):
        verify(directory, other)
    # A folder wanrt export wrote is never rebuilt: the run is refused with the command to run.
    exported = ArtifactStore(tmp_path, build=False, rebuild_hint="run `wanrt export`")
    error = StaleArtifactError if field not in ("device_arch", "precision", "weights_sha256") else MissingArtifactError
    with pytest.raises(error, match="wanrt export"):
        exported.find(other, PROFILE)


def test_an_upgraded_environment_rebuilds_the_slot_in_place(tmp_path):
    store = ArtifactStore(tmp_path)
    builder = CountingBuilder(b"old")
    directory, _ = store.get(IDENTITY, PROFILE, builder)
    upgraded = dataclasses.replace(IDENTITY, torch_version="9.9.9")
    builder.payload = b"new"
    rebuilt, manifest = store.get(upgraded, PROFILE, builder)
    assert builder.calls == 2 and rebuilt == directory
    assert manifest.identity.torch_version == "9.9.9" and (rebuilt / "model.bin").read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".build-")] == []


def test_a_manifest_edited_on_disk_makes_the_artifact_stale(tmp_path):
    store = ArtifactStore(tmp_path)
    builder = CountingBuilder()
    directory, _ = store.get(IDENTITY, PROFILE, builder)
    raw = json.loads((directory / MANIFEST_FILE).read_text())
    raw["identity"]["device_arch"] = "sm_80"  # e.g. a folder copied from another machine
    (directory / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(StaleArtifactError, match="sm_80"):
        verify(directory, IDENTITY)
    store.get(IDENTITY, PROFILE, builder)
    assert builder.calls == 2 and read_manifest(directory).identity == IDENTITY


def test_one_changed_byte_is_refused_and_never_rebuilt_over(tmp_path):
    store = ArtifactStore(tmp_path)
    builder = CountingBuilder()
    directory, _ = store.get(IDENTITY, PROFILE, builder)
    artifact = directory / "model.bin"
    data = bytearray(artifact.read_bytes())
    data[3] ^= 0x01
    artifact.write_bytes(bytes(data))
    with pytest.raises(TamperedArtifactError, match="model.bin does not match its manifest"):
        verify(directory, IDENTITY)
    with pytest.raises(TamperedArtifactError):
        store.get(IDENTITY, PROFILE, builder)
    assert builder.calls == 1  # refused, not silently replaced
    artifact.unlink()
    with pytest.raises(TamperedArtifactError, match="missing"):
        verify(directory, IDENTITY)


def test_a_manifest_naming_files_outside_its_folder_is_refused(tmp_path):
    directory, _ = ArtifactStore(tmp_path).get(IDENTITY, PROFILE, CountingBuilder())
    raw = json.loads((directory / MANIFEST_FILE).read_text())
    raw["files"] = {"../elsewhere.bin": "00" * 32}
    (directory / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(TamperedArtifactError, match="outside the folder"):
        verify(directory, IDENTITY)
    (directory / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(TamperedArtifactError, match="unreadable manifest"):
        verify(directory, IDENTITY)


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    def failing(folder: Path) -> BuiltFiles:
        (folder / "model.bin").write_bytes(b"half")
        raise RuntimeError("compiler crashed")

    store = ArtifactStore(tmp_path)
    with pytest.raises(RuntimeError, match="compiler crashed"):
        store.get(IDENTITY, PROFILE, failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".locks"]
    with pytest.raises(MissingArtifactError):
        store.find(IDENTITY, PROFILE)


_CONCURRENT_BUILDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from wanrt.export.manifest import ArtifactStore, BuiltFiles, Identity
    from wanrt.export.specs import ShapeProfile

    root, log = Path(sys.argv[1]), Path(sys.argv[2])
    identity = Identity("dit_block", "aoti", "2.13.0", "fp8/bfloat16", "sm_90", "ab" * 32)
    profile = ShapeProfile("p", {"x": ((1, 32, 64), (1, 48, 64), (1, 72, 64))})

    def build(folder):
        with open(log, "a") as handle:
            handle.write("build\\n")
        time.sleep(1.5)  # long enough for the other process to reach the lock
        (folder / "model.bin").write_bytes(b"compiled code")
        return BuiltFiles(("model.bin",), dynamic=True)

    Path(sys.argv[3]).touch()  # started
    directory, manifest = ArtifactStore(root).get(identity, profile, build)
    print(directory)
""")


def test_concurrent_builders_build_once_and_both_get_the_artifact(tmp_path):
    script = tmp_path / "builder.py"
    script.write_text(_CONCURRENT_BUILDER)
    root, log = tmp_path / "store", tmp_path / "builds.log"
    processes = [subprocess.Popen([sys.executable, str(script), str(root), str(log), str(tmp_path / f"started{i}")],
                                  stdout=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=120)[0].strip() for p in processes]
    assert [p.returncode for p in processes] == [0, 0]
    assert log.read_text().count("build") == 1, "exactly one process builds; the other waits and reuses"
    assert outputs[0] == outputs[1]
    verify(Path(outputs[0]), IDENTITY)


def test_the_cache_evicts_least_recently_used_artifacts_to_its_cap(tmp_path):
    store = ArtifactStore(tmp_path)
    payload = b"x" * 4096
    built = {}
    for index, low in enumerate((10, 20, 30)):
        identity = dataclasses.replace(IDENTITY, weights_sha256=f"{index:064d}")
        built[low], _ = store.get(identity, _profile(low, low), CountingBuilder(payload))
        os.utime(built[low] / ".last_used", ns=(index * 10**9, index * 10**9))
        if store.max_bytes is None:  # a cap that two artifacts fit under, three do not
            size = sum(p.stat().st_size for p in built[low].iterdir())
            store.max_bytes = int(2.5 * size)
    # Two artifacts fit under the cap: building the third evicted the least recently used.
    assert not built[10].exists() and built[20].exists() and built[30].exists()
    # Using the older one makes the other the eviction candidate.
    store.find(dataclasses.replace(IDENTITY, weights_sha256=f"{1:064d}"), _profile(20, 20))
    store.get(dataclasses.replace(IDENTITY, weights_sha256=f"{3:064d}"), _profile(40, 40), CountingBuilder(payload))
    assert built[20].exists() and not built[30].exists()
    assert len([p for p in tmp_path.iterdir() if (p / MANIFEST_FILE).is_file()]) == 2
