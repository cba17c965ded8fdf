"""The video store: `<root>/<prompt_set>/<request_key>.mp4` plus a `.json` provenance sidecar.

The root is any fsspec URL or local path (through universal-pathlib). A file appears under its
final name complete or not at all, so a reader never sees a half-written video; a video whose
sha256 matches its sidecar is "verified" and never downloaded again. How depends on the filesystem:

- Where a rename is atomic (a local disk), a file is written under a temporary sibling name and
  renamed once complete (and checked, for a video).
- On an object store (S3 and the like) a rename is a copy and a delete, and a temporary object is
  what a crash leaves behind. There a file is written on local disk (the temp folder), checked
  there, and uploaded to its final key in one put: a single PUT, or a multipart upload that the
  store assembles only when it is completed (and that s3fs aborts on error). An object is all or
  nothing; nothing temporary is ever written to the store.

Local temporary names say who wrote them (`.<name>.<host tag>-<pid>-<token>.part`), so a later
collection can sweep what a killed writer left (SIGKILL skips every `finally`) without touching a
file that another live process is still writing, and without touching anything the project did not name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import IO, Any

from upath import UPath

SLUG = re.compile(r"[a-z0-9][a-z0-9_-]*")
KEY = re.compile(r"[0-9a-f]{16,64}")
CHUNK = 1024 * 1024
HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
# What the project names as temporaries, and nothing else: `.<file>.<host>-<pid>-<token>.part`.
TEMPORARY = re.compile(r"\.(?P<name>[\w.-]+)\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}\.part")
# Where a set keeps the videos of a request bought from other APIs than the one now stored in it.
BY_API = "by-api"
# Where the store keeps each video's preview (wan_pipeline.previews), shared by every set.
PREVIEWS = ".previews"
# A temporary of another host is swept once it is this old (its writer cannot be asked).
FOREIGN_TEMPORARY_AGE_S = 3600.0
# Protocols whose rename is atomic (universal-pathlib gives a plain local path the protocol "").
RENAMING_PROTOCOLS = frozenset({"", "file", "local", "memory"})
# The sidecar key recording the stored video's `file_stamp` when it was hashed and probed.
FILE_STAMP = "file_stamp"
REHASH_VARIABLE = "WAN_PIPELINE_REHASH"
# A local stamp is trusted only if taken this long after the file's mtime: coarser than the clock
# tick filesystems stamp mtimes with (jiffies: 1-10 ms on ext4, xfs, btrfs, tmpfs).
RACY_MTIME_NS = 20_000_000


def _checked(pattern: re.Pattern[str], value: str, what: str) -> str:
    # Output names come from slugs and hashes only: never from free text (no path traversal).
    if not pattern.fullmatch(value):
        raise ValueError(f"{what} {value!r} is not allowed in a file name (expected {pattern.pattern})")
    return value


def renames_atomically(path: UPath) -> bool:
    """Whether `path`'s filesystem renames atomically (a local disk, fsspec's memory filesystem):
    there files are staged beside their final name. Elsewhere (object stores) they are uploaded."""
    return path.protocol in RENAMING_PROTOCOLS


class StagedFile:
    """A file being written and checked at `path`; `publish` gives it its final name `final`."""

    def __init__(self, path: UPath, final: UPath):
        self.path, self.final = path, final

    def publish(self) -> UPath:
        if renames_atomically(self.final):
            self.path.rename(self.final)
        else:
            # One upload from local disk: the key holds the whole file from the moment it exists.
            self.final.fs.put_file(str(self.path), self.final.path)
        return self.final


@contextlib.contextmanager
def staged_file(destination: str | UPath) -> Iterator[StagedFile]:
    """A temporary file for `destination`, removed on leaving the block unless it was published: a
    sibling temporary name where renames are atomic, a file in the local temp folder otherwise (so
    a video is probed and measured on local disk before its one upload)."""
    final = UPath(destination)
    if renames_atomically(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        path = temporary_path(final)
    else:
        descriptor, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part")
        os.close(descriptor)
        path = UPath(name)
    try:
        yield StagedFile(path, final)
    finally:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_writer(destination: str | UPath) -> Iterator[IO[bytes]]:
    """Write a file that appears under `destination` only if the block succeeds, and then complete."""
    with staged_file(destination) as staged:
        with staged.path.open("wb") as handle:
            yield handle
        staged.publish()


def write_atomically(destination: str | UPath, data: bytes) -> UPath:
    """`destination` holds `data` complete, or keeps what it held (one put on an object store)."""
    with atomic_writer(destination) as handle:
        handle.write(data)
    return UPath(destination)


def _scope_slug(api_scope: str) -> str:
    """A folder name for an API scope (`https://api.aimlapi.com` -> `https-api.aimlapi.com`)."""
    return re.sub(r"[^a-z0-9.]+", "-", api_scope.lower()).strip("-.") or "unknown"


def temporary_path(final: UPath) -> UPath:
    """A sibling temporary name for `final` that says which process writes it."""
    return final.with_name(f".{final.name}.{HOST_TAG}-{os.getpid()}-{uuid.uuid4().hex[:8]}.part")


def _writer_gone(host: str, pid: int, modified: float | None) -> bool:
    if host != HOST_TAG:
        return modified is not None and time.time() - modified > FOREIGN_TEMPORARY_AGE_S
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def sweep_temporaries(folder: UPath) -> list[str]:
    """Remove the temporaries in `folder` whose writer is gone; returns their names. On an object
    store there is nothing to sweep (nothing is written there under a temporary name): not even listed."""
    if not renames_atomically(folder) or not folder.exists():
        return []
    removed = []
    for path in folder.iterdir():
        match = TEMPORARY.fullmatch(path.name)
        if match is None:
            continue
        try:
            modified = path.stat().st_mtime
        except (OSError, AttributeError):
            modified = None
        if _writer_gone(match["host"], int(match["pid"]), modified):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            removed.append(path.name)
    return removed


def rehash_unchanged(environ: Mapping[str, str] | None = None) -> bool:
    """`WAN_PIPELINE_REHASH=always`: hash (and probe) every stored video on every verification, even
    one whose file stamp says it is unchanged since it was hashed. The default is `changed`."""
    value = (os.environ if environ is None else environ).get(REHASH_VARIABLE, "changed").strip().lower() or "changed"
    if value not in ("changed", "always"):
        raise ValueError(f"{REHASH_VARIABLE}={value!r}: expected 'changed' (the default) or 'always'")
    return value == "always"


def file_stamp(path: str | UPath) -> dict[str, Any] | None:
    """What changes whenever a stored file's bytes change, read without reading them: size, mtime and
    inode on a local disk (what git's index trusts), size and ETag on an object store. None where the
    filesystem offers neither (such a file is hashed every time) or the file is gone."""
    target = UPath(path)
    try:
        if target.protocol in ("", "file", "local"):
            stat = os.stat(target.path)
            return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": f"{stat.st_dev}:{stat.st_ino}",
                    "taken_ns": time.time_ns()}
        info = target.fs.info(target.path)
    except (OSError, ValueError):
        return None
    etag = info.get("ETag") or info.get("etag")
    return {"size": info.get("size"), "etag": str(etag).strip('"')} if etag else None


def hashed_stamp(path: str | UPath, sha256: str) -> dict[str, Any] | None:
    """The file's stamp with the sha256 its bytes were just found to have, for its sidecar (`FILE_STAMP`)."""
    stamp = file_stamp(path)
    return None if stamp is None else {**stamp, "sha256": sha256}


def unchanged_since_hashed(path: str | UPath, sidecar: dict[str, Any] | None) -> bool:
    """The sidecar records the file's stamp (`FILE_STAMP`) from when its bytes hashed to the sha256 the
    sidecar records, and the file at `path` still has it. A local stamp taken within `RACY_MTIME_NS`
    of the file's last write proves nothing (a write in the same clock tick leaves the mtime as it
    was: git's "racy" entries): such a file is hashed again."""
    recorded = (sidecar or {}).get(FILE_STAMP)
    video = (sidecar or {}).get("video")
    if not isinstance(recorded, dict) or not isinstance(video, dict) or rehash_unchanged():
        return False
    if not recorded.get("sha256") or recorded.get("sha256") != video.get("sha256"):
        return False  # the stamp vouches for other bytes than those the sidecar describes
    current = file_stamp(path)
    if current is None or any(current[k] != recorded.get(k) for k in current if k != "taken_ns"):
        return False
    if "mtime_ns" in recorded:
        taken = recorded.get("taken_ns")
        return isinstance(taken, int) and recorded["mtime_ns"] + RACY_MTIME_NS < taken
    return True


def file_sha256(path: str | UPath) -> tuple[int, str]:
    """Size and sha256 of a stored file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with UPath(path).open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


class VideoStore:
    def __init__(self, root: str | UPath):
        self.root = UPath(root)

    def __repr__(self) -> str:
        return f"VideoStore({str(self.root)!r})"

    def set_dir(self, prompt_set: str) -> UPath:
        return self.root / _checked(SLUG, prompt_set, "prompt set")

    def video_path(self, prompt_set: str, request_key: str) -> UPath:
        return self.set_dir(prompt_set) / f"{_checked(KEY, request_key, 'request key')}.mp4"

    def staged_video(self, prompt_set: str, request_key: str) -> contextlib.AbstractContextManager[StagedFile]:
        """Where a download waits until it is verified and probed; `publish()` stores it."""
        return staged_file(self.video_path(prompt_set, request_key))

    def copy_verified(self, source: str | UPath, prompt_set: str, request_key: str, sha256: str) -> UPath | None:
        """Copy a stored video into `prompt_set`'s folder and verify its sha256 by reading the copy
        back. None when the source is gone or differs (and then nothing of it is left here).

        Inside one object store the copy is server-side, straight to the final key (a temporary key
        is an object a crash would leave behind); a copy that does not hash to `sha256` is deleted,
        and until then it counts for nothing: a video is only verified by a sidecar recording its
        hash, written after this returns. Anywhere else the copy is staged and published as a download is."""
        source, final = UPath(source), self.video_path(prompt_set, request_key)
        try:
            if source.protocol == final.protocol and not renames_atomically(final):
                final.fs.copy(source.path, final.path)
                if file_sha256(final)[1] == sha256:
                    return final
                final.unlink(missing_ok=True)
                return None
            with staged_file(final) as staged:
                if source.protocol == staged.path.protocol:
                    source.fs.copy(source.path, staged.path.path)
                else:
                    with source.open("rb") as reader, staged.path.open("wb") as writer:
                        shutil.copyfileobj(reader, writer, CHUNK)
                if file_sha256(staged.path)[1] != sha256:
                    return None
                return staged.publish()
        except FileNotFoundError:
            return None

    def move_aside(self, prompt_set: str, request_key: str, api_scope: str) -> UPath | None:
        """Move a request's video and sidecar bought from another API to `<set>/by-api/<scope>/`, so
        this API's video can take its place without destroying a paid one. None when there is none."""
        video, sidecar = self.video_path(prompt_set, request_key), self.sidecar_path(prompt_set, request_key)
        if not video.exists():
            return None
        folder = self.set_dir(prompt_set) / BY_API / _scope_slug(api_scope)
        folder.mkdir(parents=True, exist_ok=True)
        video.rename(folder / video.name)
        if sidecar.exists():
            sidecar.rename(folder / sidecar.name)
        return folder / video.name

    def sweep(self, prompt_set: str) -> list[str]:
        """Remove what killed writers left in the set's folder and among the previews (only the
        project's own temporaries)."""
        return sweep_temporaries(self.set_dir(prompt_set)) + sweep_temporaries(self.root / PREVIEWS)

    def preview_path(self, sha256: str) -> UPath:
        """`<root>/.previews/<sha256>.jpg`: a video's preview, named by its content, so never stale."""
        return self.root / PREVIEWS / f"{_checked(KEY, sha256, 'video sha256')}.jpg"

    def sidecar_path(self, prompt_set: str, request_key: str) -> UPath:
        return self.set_dir(prompt_set) / f"{_checked(KEY, request_key, 'request key')}.json"

    def write_sidecar(self, prompt_set: str, request_key: str, provenance: dict[str, Any]) -> UPath:
        return write_atomically(
            self.sidecar_path(prompt_set, request_key),
            json.dumps(provenance, indent=2, sort_keys=True, default=str).encode(),
        )

    def read_sidecar(self, prompt_set: str, request_key: str) -> dict[str, Any] | None:
        path = self.sidecar_path(prompt_set, request_key)
        if not path.exists():
            return None
        try:
            provenance = json.loads(path.read_text())
        except (ValueError, OSError):
            return None
        # Valid JSON that is not an object (a hand-edited file) is as unusable as a corrupt one.
        return provenance if isinstance(provenance, dict) else None

    def is_verified(self, prompt_set: str, request_key: str, sidecar: dict[str, Any] | None = None) -> bool:
        """The video exists and its bytes hash to what its sidecar (read unless given) recorded; a file
        whose stamp is still the one the sidecar recorded is not hashed again (`unchanged_since_hashed`)."""
        video = self.video_path(prompt_set, request_key)
        sidecar = self.read_sidecar(prompt_set, request_key) if sidecar is None else sidecar
        video_record = (sidecar or {}).get("video")
        expected_sha256 = video_record.get("sha256") if isinstance(video_record, dict) else None
        if not expected_sha256 or not video.exists():
            return False
        return unchanged_since_hashed(video, sidecar) or file_sha256(video)[1] == expected_sha256
