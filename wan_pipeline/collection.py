"""Collecting finished generations into each set's folder, and filing their provenance.

A video is stored once per set: a file whose sha256 matches its sidecar (for this API) is kept; a
request another set already stored is copied inside the store, verified by sha256, with no call to
the provider (its signed URL may be long expired: the real API keeps results 24 h); anything else
is downloaded to a temporary file, checked (size, hash, probe) and only then given its final name
(renamed on a local disk, uploaded in one put to an object store: see `wan_pipeline.storage`).
An expired signed URL is refreshed by polling the generation again. The sidecar next to each video
is the experiment's record: which API bought it, what was asked (the image identified by content),
what was paid, how long it took, and what came back (probed, not assumed).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from upath import UPath

from wan_pipeline import __version__
from wan_pipeline.api import ApiError, AsyncAimlApiClient, DownloadExpired
from wan_pipeline.catalog import CatalogRequest
from wan_pipeline.ledger import IllegalTransition, Ledger, LedgerRow, State, StoredVideo, VideoSource
from wan_pipeline.media import MediaDecodeError, VideoProbe, matches_request, probe_video
from wan_pipeline.previews import store_preview
from wan_pipeline.quality import QualityThresholds, assess_video
from wan_pipeline.safe_text import printable
from wan_pipeline.scopes import LEGACY_SCOPE, api_origin
from wan_pipeline.storage import FILE_STAMP, VideoStore, file_sha256, hashed_stamp, unchanged_since_hashed

log = logging.getLogger(__name__)

# Refresh a signed URL that expires within this margin rather than start a download that will fail.
URL_EXPIRY_MARGIN = timedelta(seconds=30)


@dataclass
class CollectedVideo:
    request_key: str
    path: str
    sha256: str
    size_bytes: int
    probe: dict[str, Any]
    how: Literal["downloaded", "copied", "kept"]  # kept: a verified file was already there
    quality: dict[str, Any] | None = None  # the sidecar's `quality` (see `wan_pipeline.quality`)

    @property
    def downloaded(self) -> bool:
        return self.how == "downloaded"


@dataclass
class CollectReport:
    videos: list[CollectedVideo] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    refreshed_urls: int = 0
    swept: list[str] = field(default_factory=list)  # temporaries of killed writers removed

    def count(self, how: str) -> int:
        return sum(v.how == how for v in self.videos)

    @property
    def bytes_downloaded(self) -> int:
        return sum(v.size_bytes for v in self.videos if v.downloaded)


def expects_audio(request: CatalogRequest) -> bool:
    return bool(request.request.audio_url) or request.request.generate_audio


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def build_provenance(
    request: CatalogRequest,
    row: LedgerRow,
    scope: str,
    base_url: str,
    *,
    sha256: str,
    size_bytes: int,
    probe: dict[str, Any],
    reused_from: dict[str, str] | None = None,
    quality: dict[str, Any] | None = None,
    stamp: dict[str, Any] | None = None,
) -> dict[str, Any]:
    processing_s = (
        (row.completed_at - row.submitted_at).total_seconds() if row.completed_at and row.submitted_at else None
    )
    provenance = {
        "generation_id": row.generation_id,
        "request_key": request.request_key,
        "prompt_set": request.prompt_set,
        "api": {"scope": scope, "origin": api_origin(base_url)},
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
            "stored_at": datetime.now(UTC).isoformat(),
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
    if quality is not None:
        provenance["quality"] = quality
    if stamp is not None:
        # How the stored file looked right after it was hashed and probed: a later collection or check
        # that finds it so trusts those results instead of reading the whole file again.
        provenance[FILE_STAMP] = stamp
    if reused_from:
        # Bought once, by another set: this set's copy cost nothing.
        provenance["reused_from"] = reused_from
        provenance["cost"] = {**provenance["cost"], "usd_spent_by_this_set": 0.0}
    return provenance


def local_source_image(request: CatalogRequest) -> bytes | None:
    """The bytes of the request's source image when it is a local or fsspec file that still has the
    sha256 it was bought with; None for an http(s) image (never fetched here) or a changed file."""
    ref = request.request.image_url
    if request.image_sha256 is None or ref.startswith(("http://", "https://", "data:")):
        return None
    try:
        data = UPath(ref).read_bytes()
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == request.image_sha256 else None


def measure_quality(request: CatalogRequest, path: Any, thresholds: QualityThresholds) -> dict[str, Any]:
    """The quality metrics of one stored video, as its sidecar records them (computed once per video)."""
    try:
        report = assess_video(path, source_image=local_source_image(request), expect_audio=expects_audio(request),
                              thresholds=thresholds)
    except (MediaDecodeError, OSError) as exc:
        return {"passed": False, "failures": [printable(f"unreadable: {exc}", 300)], "thresholds": thresholds.to_dict()}
    return {**report.to_dict(), "thresholds": thresholds.to_dict()}


def _probe_dict(path: Any) -> dict[str, Any]:
    probe = probe_video(path).to_dict()
    return {k: probe[k] for k in ("width", "height", "duration_s", "codec", "has_audio", "fps", "audio_codec")}


async def _fresh_url(ledger: Ledger, client: AsyncAimlApiClient, row: LedgerRow, report: CollectReport) -> str:
    """Poll the generation again: the provider signs a new URL for a finished video."""
    generation = await client.get(row.generation_id)
    await asyncio.to_thread(ledger.refresh_video_url, row.request_key, generation.video_url, generation.video_expires_at)
    report.refreshed_urls += 1
    if generation.video_url is None:
        raise ApiError(f"generation {row.generation_id} has no video URL (status {generation.raw_status})")
    return generation.video_url


def _expiring(row: LedgerRow) -> bool:
    expires = row.video_expires_at
    return expires is not None and expires - URL_EXPIRY_MARGIN <= datetime.now(UTC)


async def _download_fresh(
    ledger: Ledger, client: AsyncAimlApiClient, row: LedgerRow, destination: Any, report: CollectReport, max_bytes: int
) -> tuple[int, str]:
    """Download with the recorded URL, refreshing it first if it is about to expire, and once more
    if the host says it has expired meanwhile."""
    url = row.video_url
    if url is None or _expiring(row):
        url = await _fresh_url(ledger, client, row, report)
    try:
        return await client.download(url, destination, max_bytes=max_bytes)
    except DownloadExpired:
        return await client.download(await _fresh_url(ledger, client, row, report), destination, max_bytes=max_bytes)


def _keep_other_apis_video(ledger: Ledger, store: VideoStore, prompt_set: str, key: str, sidecar: dict[str, Any]) -> None:
    """The set's folder holds this request's video as bought from another API (or before scopes were
    recorded): a paid video too. Move it aside under `by-api/<scope>/` and tell that scope's ledger,
    instead of overwriting it with this API's video."""
    scope = (sidecar.get("api") or {}).get("scope") or LEGACY_SCOPE
    moved = store.move_aside(prompt_set, key, scope)
    if moved is None:
        return
    video = sidecar.get("video") or {}
    with contextlib.suppress(IllegalTransition, KeyError, TypeError):
        ledger.for_scope(scope).record_video(
            prompt_set, key, path=str(moved), sha256=video["sha256"], size_bytes=video["bytes"],
            source=VideoSource.COPY if sidecar.get("reused_from") else VideoSource.DOWNLOAD,
            copied_from_set=(sidecar.get("reused_from") or {}).get("prompt_set"),
        )


def _store_preview(store: VideoStore, sha256: str, path: Any) -> None:
    """The sheets' picture of this video, made while it is on local disk and its frames are fresh in
    the page cache. Best effort: a sheet makes a missing preview itself."""
    try:
        if not store.preview_path(sha256).exists():  # the same bytes stored before (another seed, say)
            store_preview(store, sha256, path)
    except (MediaDecodeError, OSError) as exc:
        log.warning("no preview of %s: %s", sha256[:12], printable(str(exc), 300))


def _sidecar_matches(sidecar: dict[str, Any] | None, scope: str) -> bool:
    """A sidecar describes a video bought from this API (one from another API, or from before scopes
    were recorded, is not this purchase's video even under the same request key)."""
    return bool(sidecar) and (sidecar.get("api") or {}).get("scope") == scope


def _keep_stored(
    ledger: Ledger,
    store: VideoStore,
    request: CatalogRequest,
    sidecar: dict[str, Any] | None,
    copies: list[StoredVideo],
    thresholds: QualityThresholds,
) -> CollectedVideo | None:
    """This API's video of the request, already in the set's folder, kept when it is verified: unchanged
    since it was hashed (its stamp), else hashed again (and stamped anew). None: there is none (or
    another API's), or it must be replaced."""
    if not _sidecar_matches(sidecar, ledger.scope):
        return None
    key, prompt_set = request.request_key, request.prompt_set
    path = store.video_path(prompt_set, key)
    recorded = next((c for c in copies if c.prompt_set == prompt_set and c.path == str(path)), None)
    updates: dict[str, Any] = {}
    if not unchanged_since_hashed(path, sidecar):
        if not store.is_verified(prompt_set, key, sidecar):
            return None
        updates[FILE_STAMP] = hashed_stamp(path, sidecar["video"]["sha256"])
    quality = sidecar.get("quality")
    if quality is None:  # stored before quality was measured: measure it once, now
        quality = updates["quality"] = measure_quality(request, path, thresholds)
    if updates:
        store.write_sidecar(prompt_set, key, {**sidecar, **updates})
    video = sidecar["video"]
    if recorded is None or recorded.sha256 != video["sha256"]:
        reused = sidecar.get("reused_from") or {}
        ledger.record_video(
            prompt_set, key, path=str(path), sha256=video["sha256"], size_bytes=video["bytes"],
            source=VideoSource.COPY if reused else VideoSource.DOWNLOAD, copied_from_set=reused.get("prompt_set"),
        )
    return CollectedVideo(key, str(path), video["sha256"], video["bytes"], video, "kept", quality)


async def _collect_one(
    ledger: Ledger,
    client: AsyncAimlApiClient,
    store: VideoStore,
    request: CatalogRequest,
    row: LedgerRow,
    copies: list[StoredVideo],
    report: CollectReport,
    thresholds: QualityThresholds,
    *,
    found_stale: bool = False,  # the file in the set's folder was just checked and must be replaced
) -> None:
    key, prompt_set = request.request_key, request.prompt_set
    video_path = store.video_path(prompt_set, key)
    sidecar = await asyncio.to_thread(store.read_sidecar, prompt_set, key)
    if not found_stale:
        kept = await asyncio.to_thread(_keep_stored, ledger, store, request, sidecar, copies, thresholds)
        if kept is not None:
            report.videos.append(kept)
            return
    if sidecar is not None and not _sidecar_matches(sidecar, ledger.scope):
        await asyncio.to_thread(_keep_other_apis_video, ledger, store, prompt_set, key, sidecar)
    for copy in copies:
        if copy.path == str(video_path):
            continue  # the file that just failed to verify
        copied = await asyncio.to_thread(store.copy_verified, copy.path, prompt_set, key, copy.sha256)
        if copied is None:
            continue  # that copy is gone or changed: try the next, else download
        source = await asyncio.to_thread(store.read_sidecar, copy.prompt_set, key) or {}
        probe = source.get("video") or await asyncio.to_thread(_probe_dict, copied)
        # The same bytes: the source's metrics hold, unless it asked differently (it cannot: same key).
        quality = source.get("quality") or await asyncio.to_thread(measure_quality, request, copied, thresholds)
        provenance = build_provenance(
            request, row, ledger.scope, client.config.base_url, sha256=copy.sha256, size_bytes=copy.size_bytes,
            probe={k: v for k, v in probe.items() if k not in ("sha256", "bytes")},
            reused_from={"prompt_set": copy.prompt_set, "path": copy.path}, quality=quality,
            stamp=await asyncio.to_thread(hashed_stamp, copied, copy.sha256),
        )
        await asyncio.to_thread(store.write_sidecar, prompt_set, key, provenance)
        await asyncio.to_thread(
            ledger.record_video, prompt_set, key, path=str(copied), sha256=copy.sha256, size_bytes=copy.size_bytes,
            source=VideoSource.COPY, copied_from_set=copy.prompt_set,
        )
        report.videos.append(CollectedVideo(key, str(copied), copy.sha256, copy.size_bytes, probe, "copied", quality))
        return
    try:
        # Whatever fails the size, hash or probe check never reaches the video's final name: it is
        # published (renamed, or uploaded to an object store) only once checked and measured.
        with store.staged_video(prompt_set, key) as staged:
            size, sha = await _download_fresh(
                ledger, client, row, staged.path, report, client.config.max_video_bytes_for(request.request)
            )
            probe = await asyncio.to_thread(_probe_dict, staged.path)
            quality = await asyncio.to_thread(measure_quality, request, staged.path, thresholds)
            await asyncio.to_thread(_store_preview, store, sha, staged.path)
            final = await asyncio.to_thread(staged.publish)
            stamp = await asyncio.to_thread(hashed_stamp, final, sha)
    except (ApiError, MediaDecodeError, OSError) as exc:
        why = printable(f"{exc.__class__.__name__}: {exc}", 500)
        await asyncio.to_thread(ledger.note_collection_problem, key, f"not stored: {why}")
        report.failures.append((key, why))
        return
    provenance = build_provenance(
        request, row, ledger.scope, client.config.base_url, sha256=sha, size_bytes=size, probe=probe, quality=quality,
        stamp=stamp,
    )
    await asyncio.to_thread(store.write_sidecar, prompt_set, key, provenance)
    await asyncio.to_thread(ledger.record_video, prompt_set, key, path=str(final), sha256=sha, size_bytes=size)
    report.videos.append(CollectedVideo(key, str(final), sha, size, probe, "downloaded", quality))


def collect_videos(
    ledger: Ledger,
    client_factory: Callable[[], AsyncAimlApiClient],
    store: VideoStore,
    requests: Sequence[CatalogRequest],
    *,
    thresholds: QualityThresholds | None = None,
    follow: bool = False,
) -> CollectReport:
    """Store every completed generation of `requests` in their set's folder: keep a verified file,
    copy one another set already stored (no call to the provider), or download it. Each stored
    video's quality metrics are measured once and kept in its sidecar (thresholds: from the
    environment unless given).

    Videos the ledger does not record as stored in their set go first. A stored file whose stamp says
    it is unchanged since it was hashed is kept without reading it (`WAN_PIPELINE_REHASH=always`:
    every file is hashed again). `follow` (an increment, others still running): then also store the
    generations that complete meanwhile (the sensor keeps polling), pass after pass, until a pass
    finds none: a video finishing during an increment is stored by it, not by the next run."""
    thresholds = thresholds or QualityThresholds.from_env()

    def completed(among: Sequence[CatalogRequest]) -> list[tuple[CatalogRequest, LedgerRow]]:
        """Those of `among` whose generation the ledger records as completed now, with their rows."""
        rows = {row.request_key: row for row in ledger.rows_for_keys(r.request_key for r in among)}
        return [(r, rows[r.request_key]) for r in among
                if r.request_key in rows and rows[r.request_key].state == State.COMPLETED]

    todo = completed(requests)
    report = CollectReport()
    for prompt_set in sorted({r.prompt_set for r in requests}):
        report.swept += store.sweep(prompt_set)
    copies = ledger.stored_videos(r.request_key for r, _ in todo)

    def recorded_here(request: CatalogRequest) -> bool:
        return any(c.prompt_set == request.prompt_set for c in copies.get(request.request_key, []))

    new = [pair for pair in todo if not recorded_here(pair[0])]
    recorded = [pair for pair in todo if recorded_here(pair[0])]

    def keep_recorded() -> list[tuple[CatalogRequest, LedgerRow]]:
        """Keep each file this set's ledger records, unread while it has its stamp: one thread for all
        of them (a few stat calls and a sidecar each), beside the downloads. Returns those to replace."""
        replace = []
        for request, row in recorded:
            sidecar = store.read_sidecar(request.prompt_set, request.request_key)
            kept = _keep_stored(ledger, store, request, sidecar, copies[request.request_key], thresholds)
            if kept is None:
                replace.append((request, row))
            else:
                report.videos.append(kept)
        return replace

    async def run() -> None:
        async with client_factory() as client:
            # Bounded like the API calls: hundreds of streams queued at once in the connection pool
            # only time out waiting for a connection.
            slots = asyncio.Semaphore(client.config.max_concurrency)

            async def collect_one(request: CatalogRequest, row: LedgerRow, found_stale: bool = False) -> None:
                async with slots:
                    await _collect_one(
                        ledger, client, store, request, row, copies.get(request.request_key, []), report, thresholds,
                        found_stale=found_stale,
                    )

            downloads = asyncio.gather(*(collect_one(r, row) for r, row in new))
            replace = await asyncio.to_thread(keep_recorded)
            await downloads
            await asyncio.gather(*(collect_one(r, row, found_stale=True) for r, row in replace))
            handled = {r.request_key for r, _ in todo}
            while follow:
                fresh = await asyncio.to_thread(completed, [r for r in requests if r.request_key not in handled])
                if not fresh:
                    break
                handled.update(r.request_key for r, _ in fresh)
                copies.update(await asyncio.to_thread(ledger.stored_videos, (r.request_key for r, _ in fresh)))
                await asyncio.gather(*(collect_one(r, row) for r, row in fresh))

    if todo or follow:
        asyncio.run(run())
    order = {r.request_key: i for i, r in enumerate(requests)}
    report.videos.sort(key=lambda video: order[video.request_key])  # catalog order, however they finished
    return report


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)  # [] when every video is sound
    checked: int = 0
    hashed: int = 0  # read again: changed since hashed, racy, never stamped, or WAN_PIPELINE_REHASH=always


def _recorded_probe(video: dict[str, Any]) -> VideoProbe | None:
    """The probe a sidecar recorded when its video was hashed and probed; None if it lacks a field."""
    try:
        return VideoProbe(
            width=int(video["width"]), height=int(video["height"]), duration_s=float(video["duration_s"]),
            fps=video.get("fps"), codec=str(video["codec"]), has_audio=bool(video["has_audio"]),
            audio_codec=video.get("audio_codec"), frame_count=None,
        )
    except (KeyError, TypeError, ValueError):
        return None


def verify_videos(store: VideoStore, requests: Sequence[CatalogRequest], completed_keys: set[str]) -> VerifyReport:
    """Check the stored videos of completed generations.

    Each video must exist, decode to its last frame, match its request's resolution, duration and
    audio, and hash to the sha256 its sidecar records. A file unchanged since it was hashed and probed
    (the stamp its sidecar recorded: size, mtime and inode, or the object's ETag) is judged on what
    its sidecar recorded then; any other is hashed and probed again.
    """
    report = VerifyReport()
    for request in requests:
        key = request.request_key
        if key not in completed_keys:
            continue
        report.checked += 1
        path = store.video_path(request.prompt_set, key)
        sidecar = store.read_sidecar(request.prompt_set, key)
        if not path.exists():
            report.problems.append(f"{key}: no video at {path}")
            continue
        if sidecar is None:
            report.problems.append(f"{key}: no provenance sidecar beside {path}")
            continue
        recorded = sidecar.get("video") if isinstance(sidecar.get("video"), dict) else {}
        probe = _recorded_probe(recorded) if unchanged_since_hashed(path, sidecar) else None
        if probe is None:
            report.hashed += 1
            _, sha = file_sha256(path)
            if sha != recorded.get("sha256"):
                report.problems.append(f"{key}: sha256 {sha[:12]}... differs from the sidecar's")
            try:
                probe = probe_video(path)
            except MediaDecodeError as exc:
                report.problems.append(f"{key}: {exc}")
                continue
        mismatches = matches_request(
            probe,
            resolution=request.request.resolution,
            duration_s=request.request.duration,
            expect_audio=expects_audio(request),
        )
        report.problems.extend(f"{key}: {m}" for m in mismatches)
    return report
