"""A real S3-compatible server on loopback for the object-store tests: moto's standalone server.

Also a child process for the crash test (`python tests/s3_server.py <local file> <s3 url>`): it
publishes the file as a multipart upload, says so once every part is stored, and then waits to be
killed (SIGKILL) before it asks the server to complete the upload.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

# Credentials moto accepts as any others; the secret is distinctive so a test can look for it.
ACCESS_KEY_ID = "AKIAWANPIPELINETEST1"
SECRET_ACCESS_KEY = "wan-s3-secret-7d41c09b2e8f4a6b"
# s3fs uploads in parts once a file is twice this size; S3's smallest part but the last is 5 MiB.
SMALL_PART_BYTES = 5 * 2**20
PARTS_STORED = "every part stored"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str

    @property
    def environment(self) -> dict[str, str]:
        """What a process needs to reach it: the usual AWS variables, nothing else."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": "us-east-1",
        }


@contextlib.contextmanager
def running_s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield S3Server(f"http://127.0.0.1:{port}")
    finally:
        server.stop()


def fresh_filesystem() -> Any:
    """An s3fs client of its own, without listings cache: it sees what is in the bucket now."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def new_bucket() -> str:
    bucket = f"wan-{uuid.uuid4().hex[:12]}"
    fresh_filesystem().mkdir(bucket)
    return bucket


def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make s3fs upload a file of 10 MiB or more in 5 MiB parts (its own parts are 50 MiB)."""
    import s3fs.core

    monkeypatch.setattr(s3fs.core, "calculate_chunksize", lambda size, chunksize=None, **_: SMALL_PART_BYTES)


def on_s3_call(monkeypatch: pytest.MonkeyPatch, hook: Callable[[str, dict[str, Any]], None]) -> None:
    """Call `hook(method, arguments)` before every S3 request s3fs makes."""
    import s3fs.core

    original = s3fs.core.S3FileSystem._call_s3

    async def call(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        hook(method, kwargs)
        return await original(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.core.S3FileSystem, "_call_s3", call)


def _upload_then_hang(local_file: str, url: str) -> None:
    from upath import UPath

    from wan_pipeline.storage import StagedFile

    with pytest.MonkeyPatch.context() as monkeypatch:
        small_parts(monkeypatch)

        def hang_before_completing(method: str, arguments: dict[str, Any]) -> None:
            if method == "complete_multipart_upload":
                print(PARTS_STORED, flush=True)
                sys.stdin.read()  # until killed: the parent never closes it

        on_s3_call(monkeypatch, hang_before_completing)
        StagedFile(UPath(local_file), UPath(url)).publish()


if __name__ == "__main__":
    _upload_then_hang(*sys.argv[1:3])
