"""Collecting finished generations: stream each video to the store, describe it, file its provenance.

A video is downloaded once: a file whose sha256 matches its sidecar is skipped. An expired signed URL
is refreshed by polling the generation again. The sidecar next to each video is the experiment's
record: what was asked (with the image identified by content), what was paid, how long it took, and
what came back (probed, not assumed).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from wan_pipeline import __version__
from wan_pipeline.api import ApiError, AsyncAimlApiClient, ClientConfig, DownloadExpired
from wan_pipeline.catalog import CatalogRequest
from wan_pipeline.ledger import PENDING_REMOTE, Ledger, LedgerRow, State
from wan_pipeline.media import MediaDecodeError, matches_request, probe_video
from wan_pipeline.storage import VideoStore, file_sha256

log = logging.getLogger(__name__)

# Refresh a signed URL that expires within this margin rather than start a download that will fail.
URL_EXPIRY_MARGIN = timedelta(seconds=30)
PENDING_STATES = {State.SUBMITTING, *PENDING_REMOTE}
# Finished videos of a set wait at most this long for its last stragglers before being collected.
COLLECT_EARLY_AFTER = timedelta(minutes=10)


@dataclass
class CollectedVideo:
    request_key: str
    path: str
    sha256: str
    size_bytes: int
    probe: dict[str, Any]
    downloaded: bool  # False when an already verified file was kept


@dataclass
class CollectReport:
    videos: list[CollectedVideo] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    refreshed_urls: int = 0

    @property
    def downloaded(self) -> int:
        return sum(v.downloaded for v in self.videos)

    @property
    def skipped_verified(self) -> int:
        return sum(not v.downloaded for v in self.videos)

    @property
    def bytes_downloaded(self) -> int:
        return sum(v.size_bytes for v in self.videos if v.downloaded)


def expects_audio(request: CatalogRequest) -> bool:
    return bool(request.request.audio_url) or request.request.generate_audio


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def build_provenance(
    request: CatalogRequest, row: LedgerRow, *, sha256: str, size_bytes: int, probe: dict[str, Any]
) -> dict[str, Any]:
    processing_s = (
        (row.completed_at - row.submitted_at).total_seconds() if row.completed_at and row.submitted_at else None
    )
    return {
        "generation_id": row.generation_id,
        "request_key": request.request_key,
        "prompt_set": request.prompt_set,
        "seed": request.request.seed,
        "seed_derived": request.seed_derived,
        "model": request.request.model,
        "request": request.provenance_request(),
        "source": {"file": request.source_file, "line": request.source_line},
        "timings": {
            "planned_at": _iso(row.planned_at),
            "submitted_at": _iso(row.submitted_at),
            "generating_at": _iso(row.generating_at),
            "completed_at": _iso(row.completed_at),
            "downloaded_at": datetime.now(UTC).isoformat(),
            "processing_s": processing_s,
        },
        "cost": {
            "credits_used": row.credits_used,
            "usd_spent": row.usd_spent,
            "estimated_usd": request.estimated_usd,
        },
        "provider": {"raw_status": row.raw_status, "attempts": row.attempts},
        "video": {"sha256": sha256, "bytes": size_bytes, **probe},
        "pipeline": {"package": "wan-pipeline", "version": __version__},
    }


def _probe_dict(path: Any) -> dict[str, Any]:
    probe = probe_video(path).to_dict()
    return {k: probe[k] for k in ("width", "height", "duration_s", "codec", "has_audio", "fps", "audio_codec")}


async def _fresh_url(ledger: Ledger, client: AsyncAimlApiClient, row: LedgerRow, report: CollectReport) -> str:
    """Poll the generation again: the provider signs a new URL for a finished video."""
    generation = await client.get(row.generation_id)
    ledger.refresh_video_url(row.request_key, generation.video_url, generation.video_expires_at)
    report.refreshed_urls += 1
    if generation.video_url is None:
        raise ApiError(f"generation {row.generation_id} has no video URL (status {generation.raw_status})")
    return generation.video_url


def _expiring(row: LedgerRow) -> bool:
    expires = row.video_expires_at
    return expires is not None and expires - URL_EXPIRY_MARGIN <= datetime.now(UTC)


async def _download_fresh(
    ledger: Ledger, client: AsyncAimlApiClient, row: LedgerRow, destination: Any, report: CollectReport
) -> tuple[int, str]:
    """Download with the recorded URL, refreshing it first if it is about to expire, and once more
    if the host says it has expired meanwhile."""
    url = row.video_url
    if url is None or _expiring(row):
        url = await _fresh_url(ledger, client, row, report)
    try:
        return await client.download(url, destination)
    except DownloadExpired:
        return await client.download(await _fresh_url(ledger, client, row, report), destination)


async def _collect_one(
    ledger: Ledger,
    client: AsyncAimlApiClient,
    store: VideoStore,
    request: CatalogRequest,
    row: LedgerRow,
    report: CollectReport,
) -> None:
    key, prompt_set = request.request_key, request.prompt_set
    video_path = store.video_path(prompt_set, key)
    sidecar = store.read_sidecar(prompt_set, key)
    if sidecar and store.is_verified(prompt_set, key):
        video = sidecar["video"]
        report.videos.append(
            CollectedVideo(key, str(video_path), video["sha256"], video["bytes"], video, downloaded=False)
        )
        return
    try:
        size, sha = await _download_fresh(ledger, client, row, video_path, report)
        probe = await asyncio.to_thread(_probe_dict, video_path)
    except (ApiError, MediaDecodeError, OSError) as exc:
        report.failures.append((key, f"{exc.__class__.__name__}: {exc}"))
        return
    store.write_sidecar(prompt_set, key, build_provenance(request, row, sha256=sha, size_bytes=size, probe=probe))
    ledger.record_download(key, path=str(video_path), sha256=sha, size_bytes=size)
    report.videos.append(CollectedVideo(key, str(video_path), sha, size, probe, downloaded=True))


def collect_videos(
    ledger: Ledger, config: ClientConfig, store: VideoStore, requests: Sequence[CatalogRequest]
) -> CollectReport:
    """Download every completed generation of `requests` that is not already verified in the store."""
    rows = {row.request_key: row for row in ledger.rows_for_keys(r.request_key for r in requests)}
    todo = [(r, rows[r.request_key]) for r in requests if r.request_key in rows and rows[r.request_key].state == State.COMPLETED]
    report = CollectReport()

    # Bounded like the API calls: hundreds of streams queued at once in the connection pool only
    # time out waiting for a connection.
    slots = asyncio.Semaphore(config.max_concurrency)

    async def collect_one(request: CatalogRequest, row: LedgerRow, client: AsyncAimlApiClient) -> None:
        async with slots:
            await _collect_one(ledger, client, store, request, row, report)

    async def run() -> None:
        async with AsyncAimlApiClient(config) as client:
            await asyncio.gather(*(collect_one(r, row, client) for r, row in todo))

    if todo:
        asyncio.run(run())
    return report


def verify_videos(store: VideoStore, requests: Sequence[CatalogRequest], completed_keys: set[str]) -> list[str]:
    """Problems with the stored videos of completed generations; [] when every one is sound.

    Each video must exist, decode to its last frame, match its request's resolution, duration and
    audio, and hash to the sha256 its sidecar records.
    """
    problems: list[str] = []
    for request in requests:
        key = request.request_key
        if key not in completed_keys:
            continue
        path = store.video_path(request.prompt_set, key)
        sidecar = store.read_sidecar(request.prompt_set, key)
        if not path.exists():
            problems.append(f"{key}: no video at {path}")
            continue
        if sidecar is None:
            problems.append(f"{key}: no provenance sidecar beside {path}")
            continue
        _, sha = file_sha256(path)
        if sha != sidecar.get("video", {}).get("sha256"):
            problems.append(f"{key}: sha256 {sha[:12]}... differs from the sidecar's")
        try:
            probe = probe_video(path)
        except MediaDecodeError as exc:
            problems.append(f"{key}: {exc}")
            continue
        mismatches = matches_request(
            probe,
            resolution=request.request.resolution,
            duration_s=request.request.duration,
            expect_audio=expects_audio(request),
        )
        problems.extend(f"{key}: {m}" for m in mismatches)
    return problems


@dataclass(frozen=True)
class SetProgress:
    """Where a prompt set stands, as the completion sensor sees it."""

    prompt_set: str
    total: int
    pending: int  # being submitted or still running at the provider
    uncollected: int  # completed without a recorded download
    fingerprint: str  # changes whenever any generation of the set changes state
    oldest_uncollected_at: datetime | None = None  # when the longest-waiting uncollected video completed

    @property
    def ready_to_collect(self) -> bool:
        """Every generation is terminal (or needs a person: in doubt, not submitted)."""
        return self.total > 0 and self.pending == 0

    def should_collect(self, now: datetime) -> bool:
        """Ready, or finished videos have waited long enough for stragglers: one stuck generation
        must not keep the set's paid videos from being downloaded before the provider drops them."""
        if self.ready_to_collect:
            return True
        waited = self.oldest_uncollected_at is not None and now - self.oldest_uncollected_at >= COLLECT_EARLY_AFTER
        return self.uncollected > 0 and waited


def set_progress(ledger: Ledger, prompt_set: str) -> SetProgress:
    rows = ledger.rows(prompt_set)
    pending = sum(row.state in PENDING_STATES for row in rows)
    uncollected = [row for row in rows if row.state == State.COMPLETED and not row.download_sha256]
    digest = hashlib.sha256()
    for row in sorted(rows, key=lambda r: r.request_key):
        digest.update(f"{row.request_key}:{row.state}\n".encode())
    oldest = min((row.completed_at for row in uncollected if row.completed_at), default=None)
    return SetProgress(prompt_set, len(rows), pending, len(uncollected), digest.hexdigest()[:16], oldest)
