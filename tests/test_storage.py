"""The video store: atomic writes, safe file names, provenance sidecars, verification by sha256.

Every test runs against a local directory and against an fsspec `memory://` root.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from upath import UPath

from wan_pipeline import storage
from wan_pipeline.storage import (
    FILE_STAMP,
    HOST_TAG,
    VideoStore,
    atomic_writer,
    file_sha256,
    file_stamp,
    hashed_stamp,
    temporary_path,
    write_atomically,
)

KEY = "0123456789abcdef" * 2
VIDEO = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8


@pytest.fixture(params=["local", "memory"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[UPath]:
    if request.param == "local":
        yield UPath(tmp_path / "videos")
        return
    memory = UPath(f"memory://storage-tests/{uuid.uuid4().hex}")
    yield memory
    if memory.exists():
        memory.fs.rm(memory.path, recursive=True)


def names_in(directory: UPath) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def store_video(store: VideoStore, data: bytes = VIDEO, prompt_set: str = "demo") -> UPath:
    with atomic_writer(store.video_path(prompt_set, KEY)) as handle:
        handle.write(data)
    return store.video_path(prompt_set, KEY)


def test_atomic_writer_renames_into_place_on_success(root: UPath) -> None:
    target = root / "set" / "clip.mp4"
    with atomic_writer(target) as handle:
        handle.write(b"first half ")
        assert not target.exists()  # nothing under the final name while writing
        handle.write(b"second half")
    assert target.read_bytes() == b"first half second half"
    assert names_in(target.parent) == ["clip.mp4"]  # no leftover .part file


def test_atomic_writer_replaces_an_existing_file(root: UPath) -> None:
    target = root / "clip.mp4"
    for content in (b"old", b"new content"):
        with atomic_writer(target) as handle:
            handle.write(content)
    assert target.read_bytes() == b"new content"
    assert names_in(root) == ["clip.mp4"]


def test_atomic_writer_leaves_nothing_when_the_block_fails(root: UPath) -> None:
    target = root / "set" / "clip.mp4"
    with pytest.raises(ConnectionError), atomic_writer(target) as handle:
        handle.write(b"half a download")
        raise ConnectionError("connection reset")
    assert not target.exists()
    assert names_in(target.parent) == []


def test_failed_rewrite_keeps_the_previous_file(root: UPath) -> None:
    target = root / "clip.mp4"
    with atomic_writer(target) as handle:
        handle.write(b"verified video")
    with pytest.raises(ConnectionError), atomic_writer(target) as handle:
        handle.write(b"half")
        raise ConnectionError("connection reset")
    assert target.read_bytes() == b"verified video"
    assert names_in(root) == ["clip.mp4"]


def test_paths_are_built_from_slug_and_key(root: UPath) -> None:
    store = VideoStore(root)
    assert store.video_path("demo-set_2", KEY) == root / "demo-set_2" / f"{KEY}.mp4"
    assert store.sidecar_path("demo-set_2", KEY) == root / "demo-set_2" / f"{KEY}.json"


@pytest.mark.parametrize("prompt_set", ["../outside", "a/b", "Demo", "", "-x", ".hidden", "set\n", "a b"])
def test_prompt_set_must_be_a_slug(root: UPath, prompt_set: str) -> None:
    store = VideoStore(root)
    with pytest.raises(ValueError, match="prompt set"):
        store.video_path(prompt_set, KEY)
    with pytest.raises(ValueError, match="prompt set"):
        store.write_sidecar(prompt_set, KEY, {})


@pytest.mark.parametrize(
    "key",
    ["../../etc/passwd", "0123456789ABCDEF", "0123456789abcde", "0123456789abcdeg", f"{KEY}/..", "x" * 16],
)
def test_request_key_must_be_hex(root: UPath, key: str) -> None:
    store = VideoStore(root)
    for build in (store.video_path, store.sidecar_path):
        with pytest.raises(ValueError, match="request key"):
            build("demo", key)


def test_sidecar_round_trip(root: UPath) -> None:
    store = VideoStore(root)
    provenance = {
        "request_key": KEY,
        "seed": 7,
        "video": {"sha256": "ab" * 32, "size_bytes": 3},
        "tags": ["a"],
    }
    path = store.write_sidecar("demo", KEY, {**provenance, "downloaded_at": datetime(2026, 1, 2, tzinfo=UTC)})
    assert path == store.sidecar_path("demo", KEY)
    assert store.read_sidecar("demo", KEY) == {**provenance, "downloaded_at": "2026-01-02 00:00:00+00:00"}
    assert names_in(path.parent) == [f"{KEY}.json"]


def test_missing_or_corrupt_sidecar_reads_as_none(root: UPath) -> None:
    store = VideoStore(root)
    assert store.read_sidecar("demo", KEY) is None
    path = store.sidecar_path("demo", KEY)
    path.parent.mkdir(parents=True, exist_ok=True)
    for garbage in (b'{"video": {"sha2', b"\xff\xfe not text", b"[1, 2]"):
        path.write_bytes(garbage)
        assert store.read_sidecar("demo", KEY) is None


def test_file_sha256_gives_size_and_digest(root: UPath) -> None:
    path = store_video(VideoStore(root))
    assert file_sha256(path) == (len(VIDEO), hashlib.sha256(VIDEO).hexdigest())


def test_video_matching_its_sidecar_is_verified(root: UPath) -> None:
    store = VideoStore(root)
    store_video(store)
    store.write_sidecar("demo", KEY, {"video": {"sha256": hashlib.sha256(VIDEO).hexdigest()}})
    assert store.is_verified("demo", KEY)


def test_video_differing_from_its_sidecar_is_not_verified(root: UPath) -> None:
    store = VideoStore(root)
    store_video(store, VIDEO[:-1] + b"!")  # same size, one byte changed
    store.write_sidecar("demo", KEY, {"video": {"sha256": hashlib.sha256(VIDEO).hexdigest()}})
    assert not store.is_verified("demo", KEY)


def stamped_sidecar(path: UPath, data: bytes = VIDEO) -> dict:
    sha = hashlib.sha256(data).hexdigest()
    return {"video": {"sha256": sha}, FILE_STAMP: hashed_stamp(path, sha)}


def test_a_file_unchanged_since_it_was_hashed_is_not_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = VideoStore(tmp_path / "videos")
    path = store_video(store)
    os.utime(path, ns=(time.time_ns(), time.time_ns() - 10**9))  # written a second before it was stamped
    store.write_sidecar("demo", KEY, stamped_sidecar(path))
    monkeypatch.setattr(storage, "file_sha256", lambda _: pytest.fail("an unchanged file was hashed again"))
    assert store.is_verified("demo", KEY)


def test_a_file_changed_in_place_after_its_stamp_is_hashed_again(tmp_path: Path) -> None:
    store = VideoStore(tmp_path / "videos")
    path = store_video(store)
    os.utime(path, ns=(time.time_ns(), time.time_ns() - 10**9))
    store.write_sidecar("demo", KEY, stamped_sidecar(path))
    with open(path, "r+b") as handle:  # same size, same inode: only the mtime tells
        handle.seek(100)
        handle.write(b"!")
    assert not store.is_verified("demo", KEY)


def test_a_stamp_of_other_bytes_than_the_sidecar_describes_is_not_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = VideoStore(tmp_path / "videos")
    path = store_video(store)
    os.utime(path, ns=(time.time_ns(), time.time_ns() - 10**9))
    sidecar = {**stamped_sidecar(path), "video": {"sha256": "0" * 64}}  # the sidecar edited after its stamp
    assert not storage.unchanged_since_hashed(path, sidecar)
    assert not store.is_verified("demo", KEY, sidecar)


def test_a_stamp_taken_in_the_tick_of_the_last_write_proves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A write in the same clock tick as the stamp leaves size, mtime and inode as they were (git's
    # "racy" case): such a stamp cannot vouch for the bytes, the file is hashed.
    store = VideoStore(tmp_path / "videos")
    path = store_video(store)
    sidecar = stamped_sidecar(path)
    sidecar[FILE_STAMP]["taken_ns"] = sidecar[FILE_STAMP]["mtime_ns"] + 1000
    hashed = []
    monkeypatch.setattr(storage, "file_sha256", lambda p: hashed.append(p) or (len(VIDEO), hashlib.sha256(VIDEO).hexdigest()))
    assert store.is_verified("demo", KEY, sidecar) and hashed


def test_rehash_always_hashes_even_an_unchanged_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = VideoStore(tmp_path / "videos")
    path = store_video(store)
    os.utime(path, ns=(time.time_ns(), time.time_ns() - 10**9))
    sidecar = stamped_sidecar(path)
    assert storage.unchanged_since_hashed(path, sidecar)
    monkeypatch.setenv("WAN_PIPELINE_REHASH", "always")
    assert not storage.unchanged_since_hashed(path, sidecar)
    monkeypatch.setenv("WAN_PIPELINE_REHASH", "sometimes")
    with pytest.raises(ValueError, match="WAN_PIPELINE_REHASH='sometimes'"):
        storage.unchanged_since_hashed(path, sidecar)


def test_without_a_stamp_the_filesystem_offers_every_check_hashes(root: UPath) -> None:
    store = VideoStore(root)
    path = store_video(store)
    if root.protocol == "memory":  # no ETag, no inode: nothing to vouch for the bytes
        assert file_stamp(path) is None
    assert not storage.unchanged_since_hashed(path, {"video": {}, FILE_STAMP: None})
    # Whatever stamp the filesystem gave is recorded; bytes changed later (same size) are still found.
    sha = hashlib.sha256(VIDEO).hexdigest()
    sidecar = {"video": {"sha256": sha}, FILE_STAMP: hashed_stamp(path, sha)}
    path.write_bytes(VIDEO[:-1] + b"!")
    assert not store.is_verified("demo", KEY, sidecar)


@pytest.mark.parametrize(
    "sidecar", [None, {}, {"video": {}}, {"video": "not a record"}, ["not", "a", "dict"]]
)
def test_video_without_a_usable_checksum_is_not_verified(root: UPath, sidecar: object) -> None:
    store = VideoStore(root)
    store_video(store)
    if sidecar is not None:
        path = store.sidecar_path("demo", KEY)
        path.write_text(json.dumps(sidecar))
    assert not store.is_verified("demo", KEY)


def test_missing_video_is_not_verified(root: UPath) -> None:
    store = VideoStore(root)
    store.write_sidecar("demo", KEY, {"video": {"sha256": hashlib.sha256(VIDEO).hexdigest()}})
    assert not store.is_verified("demo", KEY)


def test_repr_shows_the_root(root: UPath) -> None:
    assert repr(VideoStore(root)) == f"VideoStore({str(root)!r})"


def test_a_killed_writers_temporaries_are_swept_and_nothing_else(root: UPath, tmp_path: Path) -> None:
    import subprocess
    import sys

    store = VideoStore(root)
    folder = store.set_dir("demo")
    folder.mkdir(parents=True, exist_ok=True)
    # A writer that dies mid-write (SIGKILL skips the writer's own cleanup): its pid is gone.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    final = store.video_path("demo", KEY)
    orphan = final.with_name(f".{final.name}.{HOST_TAG}-{dead.pid}-0123abcd.part")
    orphan.write_bytes(b"half a video")
    # A live writer's temporary (this process), and files the project did not name, are kept.
    live = temporary_path(final)
    live.write_bytes(b"still being written")
    user_files = [folder / "notes.part", folder / f".{final.name}.part", folder / "clip.mp4"]
    for path in user_files:
        path.write_bytes(b"mine")

    assert store.sweep("demo") == [orphan.name]
    assert not orphan.exists()
    assert live.exists() and all(path.exists() for path in user_files)


def test_sweeping_a_set_also_removes_a_killed_writers_preview_temporary(root: UPath) -> None:
    import subprocess
    import sys

    store = VideoStore(root)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    preview = store.preview_path("ab" * 32)
    preview.parent.mkdir(parents=True, exist_ok=True)
    orphan = preview.with_name(f".{preview.name}.{HOST_TAG}-{dead.pid}-0123abcd.part")
    orphan.write_bytes(b"half a jpeg")
    kept = write_atomically(preview, b"a whole jpeg")

    assert store.sweep("demo") == [orphan.name]
    assert not orphan.exists() and kept.read_bytes() == b"a whole jpeg"


def test_a_verified_copy_lands_under_its_final_name_only_when_its_hash_matches(root: UPath) -> None:
    store = VideoStore(root)
    source = store_video(store, prompt_set="first")
    digest = hashlib.sha256(VIDEO).hexdigest()

    copied = store.copy_verified(source, "second", KEY, digest)
    assert copied == store.video_path("second", KEY) and copied.read_bytes() == VIDEO
    assert names_in(store.set_dir("second")) == [f"{KEY}.mp4"]

    assert store.copy_verified(source, "third", KEY, "0" * 64) is None  # the source changed
    assert store.copy_verified(store.video_path("gone", KEY), "third", KEY, digest) is None
    assert not store.set_dir("third").exists() or names_in(store.set_dir("third")) == []
