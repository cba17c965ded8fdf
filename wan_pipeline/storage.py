"""The video store: `<root>/<prompt_set>/<request_key>.mp4` plus a `.json` provenance sidecar.

The root is any fsspec URL or local path (through universal-pathlib). Files are written under a
temporary name and renamed only once complete, so a reader never sees a half-written video; a
video whose sha256 matches its sidecar is "verified" and never downloaded again.

Temporary names say who wrote them (`.<name>.<host tag>-<pid>-<token>.part`), so a later collection
can sweep what a killed writer left (SIGKILL skips every `finally`) without touching a file that
another live process is still writing, and without touching anything the project did not name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
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
# A temporary of another host is swept once it is this old (its writer cannot be asked).
FOREIGN_TEMPORARY_AGE_S = 3600.0


def _checked(pattern: re.Pattern[str], value: str, what: str) -> str:
    # Output names come from slugs and hashes only: never from free text (no path traversal).
    if not pattern.fullmatch(value):
        raise ValueError(f"{what} {value!r} is not allowed in a file name (expected {pattern.pattern})")
    return value


@contextlib.contextmanager
def atomic_writer(destination: str | UPath) -> Iterator[IO[bytes]]:
    """Write to a temporary sibling, rename onto `destination` only if the block succeeds."""
    final = UPath(destination)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = temporary_path(final)
    try:
        with partial.open("wb") as handle:
            yield handle
        partial.rename(final)
    finally:
        if partial.exists():
            partial.unlink()


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
    """Remove the temporaries in `folder` whose writer is gone; returns their names."""
    if not folder.exists():
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

    def staging_path(self, prompt_set: str, request_key: str) -> UPath:
        """Where a download waits, under a temporary name, until it is verified and probed."""
        return temporary_path(self.video_path(prompt_set, request_key))

    def promote(self, staged: UPath, prompt_set: str, request_key: str) -> UPath:
        """Give a verified file its final name."""
        final = self.video_path(prompt_set, request_key)
        staged.rename(final)
        return final

    def copy_verified(self, source: str | UPath, prompt_set: str, request_key: str, sha256: str) -> UPath | None:
        """Copy a stored video into `prompt_set`'s folder (server-side where the filesystem can), verify
        its sha256, and only then give it its final name. None when the source is gone or differs."""
        source = UPath(source)
        staged = self.staging_path(prompt_set, request_key)
        staged.parent.mkdir(parents=True, exist_ok=True)
        try:
            if source.protocol == staged.protocol:
                source.fs.copy(source.path, staged.path)
            else:
                staged.write_bytes(source.read_bytes())
            if file_sha256(staged)[1] != sha256:
                return None
            return self.promote(staged, prompt_set, request_key)
        except FileNotFoundError:
            return None
        finally:
            with contextlib.suppress(FileNotFoundError):
                if staged.exists():
                    staged.unlink()

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
        """Remove what killed writers left in the set's folder (only the project's own temporaries)."""
        return sweep_temporaries(self.set_dir(prompt_set))

    def sidecar_path(self, prompt_set: str, request_key: str) -> UPath:
        return self.set_dir(prompt_set) / f"{_checked(KEY, request_key, 'request key')}.json"

    def write_sidecar(self, prompt_set: str, request_key: str, provenance: dict[str, Any]) -> UPath:
        path = self.sidecar_path(prompt_set, request_key)
        with atomic_writer(path) as handle:
            handle.write(json.dumps(provenance, indent=2, sort_keys=True, default=str).encode())
        return path

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

    def is_verified(self, prompt_set: str, request_key: str, expected_sha256: str | None = None) -> bool:
        """The video exists and its bytes hash to what the sidecar (or the caller) recorded."""
        video = self.video_path(prompt_set, request_key)
        if not video.exists():
            return False
        if expected_sha256 is None:
            sidecar = self.read_sidecar(prompt_set, request_key) or {}
            video_record = sidecar.get("video")
            expected_sha256 = video_record.get("sha256") if isinstance(video_record, dict) else None
        if not expected_sha256:
            return False
        return file_sha256(video)[1] == expected_sha256
