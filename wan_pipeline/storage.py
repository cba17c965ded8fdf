"""The video store: `<root>/<prompt_set>/<request_key>.mp4` plus a `.json` provenance sidecar.

The root is any fsspec URL or local path (through universal-pathlib). Files are written under a
temporary name and renamed only once complete, so a reader never sees a half-written video; a
video whose sha256 matches its sidecar is "verified" and never downloaded again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import uuid
from collections.abc import Iterator
from typing import IO, Any

from upath import UPath

SLUG = re.compile(r"[a-z0-9][a-z0-9_-]*")
KEY = re.compile(r"[0-9a-f]{16,64}")
CHUNK = 1024 * 1024


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
    partial = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with partial.open("wb") as handle:
            yield handle
        partial.rename(final)
    finally:
        if partial.exists():
            partial.unlink()


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
