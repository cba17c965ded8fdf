"""The emulator's memory: generations, their clock-driven status, signed URLs, faults and counters.

Every random decision comes from its own seeded stream (create faults, poll faults, Retry-After,
generation outcomes and jitter), so each sequence is reproducible from the seed and the order of
requests on that endpoint, however the other endpoints interleave. All access goes through one
lock: the HTTP handlers run on the server's loop thread, `stats()` and `update_faults()` may be
called from the test or benchmark thread.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import random
import secrets
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from wan_pipeline.emulator.config import EmulatorConfig, FaultConfig
from wan_pipeline.emulator.validation import CreateRequest
from wan_pipeline.emulator.video import VideoFactory, VideoRecipe, recipe_for
from wan_pipeline.models import CREDITS_PER_USD

# The contract documents $0.1575/s at 1080p; the 720p price is undocumented: the emulator assumes $0.105/s.
USD_PER_SECOND = {"1080p": 0.1575, "720p": 0.105}
ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
ID_LENGTH = 21  # like the provider's ids, e.g. "V2cdWP9kao8xiofM-OvwG"
TRICKLED_ENDPOINTS = ("create", "get", "download")


def credits_for(resolution: str, duration: int) -> int:
    return round(USD_PER_SECOND[resolution] * duration * CREDITS_PER_USD)


def new_generation_id() -> str:
    # Not seeded on purpose: ids must stay unique across emulator restarts, or a client's ledger
    # could confuse a new generation with an old one.
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LENGTH))


class CreateRefused(Exception):
    """The account refuses the create (its HTTP status: 401 revoked key, 403 out of credits, 429 rate
    limit or quota, with the seconds to wait in `retry_after_s`)."""

    def __init__(self, status: int, retry_after_s: float | None = None, limit: str | None = None):
        super().__init__(status)
        self.status = status
        self.retry_after_s = retry_after_s
        self.limit = limit  # 429 only: "rate_limit" (token bucket) or "quota"


class UnknownGeneration(LookupError):
    pass


class DownloadRefused(PermissionError):
    """A video URL with a bad signature or past its expiry (the CDN answers 403)."""


@dataclass
class Generation:
    id: str
    body_hash: str
    resolution: str
    duration: int
    recipe: VideoRecipe | None = field(repr=False)  # None when fated to fail
    created_at: float
    generating_at: float
    completes_at: float
    fails: bool
    credits_used: int
    client_request_id: str | None
    response_dropped: bool
    polls: int = 0
    url_expires: int | None = None

    def status(self, now: float) -> str:
        """By wall clock alone; a video still encoding at completion is awaited by its download."""
        if now < self.generating_at:
            return "queued"
        if now < self.completes_at:
            return "generating"
        return "error" if self.fails else "completed"

    def error(self) -> dict[str, str]:
        return {
            "name": "GenerationError",
            "message": "The model failed to generate a video (emulated failure).",
        }


def _pick(rng: random.Random, outcomes: Sequence[tuple[str, float]]) -> str | None:
    """One draw per request, mapped onto the cumulative rates: at most one fault, stable order."""
    draw, edge = rng.random(), 0.0
    for name, rate in outcomes:
        edge += rate
        if draw < edge:
            return name
    return None


class EmulatorState:
    def __init__(self, config: EmulatorConfig):
        self.config = config
        self.faults = config.faults
        self.videos = VideoFactory(config.cache_dir)
        self._url_key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self.reset()

    def close(self) -> None:
        self.videos.close()

    def reset(self) -> None:
        """Forget generations and counters and restart every random stream from the seed."""
        seed = self.config.seed
        with self._lock:
            self._generations: dict[str, Generation] = {}
            self._requests: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
            self._creates_by_body: dict[str, int] = defaultdict(int)
            self._media: dict[str, bytes] = {}  # image/audio content by identity
            # The create rate limit (token bucket) and the quota (fixed windows from now), and the 429s served.
            self._tokens: float | None = None  # None: full, filled at the first check
            self._tokens_at = time.monotonic()
            self._quota_epoch = time.time()
            self._quota_window = 0
            self._quota_used = 0
            self._served_429 = {"fault": 0, "rate_limit": 0, "quota": 0}
            self._rng = {
                name: random.Random(f"{seed}/{name}")
                for name in (
                    "create-faults",
                    "get-faults",
                    "retry-after",
                    "outcomes",
                    "jitter",
                    *(f"{endpoint}-trickle" for endpoint in TRICKLED_ENDPOINTS),
                )
            }

    def update_faults(self, **changes: Any) -> FaultConfig:
        with self._lock:
            self.faults = self.faults.updated(**changes)
            return self.faults

    # -- decisions -------------------------------------------------------------------------------

    def create_fault(self) -> str | None:
        """The fault for one authenticated create: "429", "500", "502", "503", "504", "drop" or None."""
        with self._lock:
            return _pick(self._rng["create-faults"], self.faults.create_faults())

    def get_fault(self) -> str | None:
        with self._lock:
            return _pick(self._rng["get-faults"], self.faults.get_faults())

    def trickles(self, endpoint: str) -> bool:
        """Whether this answer of `endpoint` ("create", "get", "download") is sent a few bytes at a time."""
        with self._lock:
            rate = getattr(self.faults, f"{endpoint}_trickle_rate")
            return self._rng[f"{endpoint}-trickle"].random() < rate

    def key_revoked(self) -> bool:
        """Whether `auth_fail_after_creates` accepted creates have been made: every create is now a 401."""
        limit = self.faults.auth_fail_after_creates
        with self._lock:
            return limit is not None and len(self._generations) >= limit

    def retry_after(self) -> float | None:
        """Retry-After seconds for a create 429, or None when this 429 carries none."""
        with self._lock:
            if self._rng["retry-after"].random() < self.faults.create_429_retry_after_rate:
                return self.faults.retry_after_s
            return None

    # -- generations -----------------------------------------------------------------------------

    def count_429(self, limit: str) -> None:
        """Count a 429 served on create: "fault" (injected), "rate_limit" or "quota"."""
        with self._lock:
            self._served_429[limit] += 1

    def _quota_window_now(self, now: float) -> tuple[int, float]:
        """The current quota window's index and the wall time it ends (lock held); resets the count."""
        length = self.faults.create_quota_window_s
        index = math.floor((now - self._quota_epoch) / length)
        if index != self._quota_window:
            self._quota_window, self._quota_used = index, 0
        return index, self._quota_epoch + (index + 1) * length

    def _bucket_tokens(self) -> float:
        """Tokens in the create bucket now, refilled since the last look (lock held)."""
        rate, size = self.faults.create_rate_limit_per_s or 0.0, self.faults.bucket_size
        now = time.monotonic()
        tokens = size if self._tokens is None else self._tokens + (now - self._tokens_at) * rate
        self._tokens, self._tokens_at = min(float(size), tokens), now
        return self._tokens

    def _refusal(self, credits: int, now: float) -> CreateRefused | None:
        """401 once the key is revoked; 429 past the quota or the rate limit (with the seconds to wait);
        403 when the credit limit does not cover this create. Lock held; consumes nothing."""
        faults = self.faults
        limit = faults.auth_fail_after_creates
        if limit is not None and len(self._generations) >= limit:
            return CreateRefused(401)
        if faults.create_quota is not None:
            _, ends_at = self._quota_window_now(now)
            if self._quota_used >= faults.create_quota:
                return CreateRefused(429, max(1.0, float(math.ceil(ends_at - now))), "quota")
        if faults.create_rate_limit_per_s is not None:
            tokens = self._bucket_tokens()
            if tokens < 1.0:
                wait = (1.0 - tokens) / faults.create_rate_limit_per_s
                return CreateRefused(429, max(round(wait, 3), 0.001), "rate_limit")
        if faults.credit_limit is not None:
            spent = sum(g.credits_used for g in self._generations.values())
            if spent + credits > faults.credit_limit:
                return CreateRefused(403)
        return None

    def _consume_limits(self) -> None:
        """An accepted create takes a token and a place in the quota (lock held, after `_refusal`)."""
        if self.faults.create_quota is not None:
            self._quota_used += 1
        if self.faults.create_rate_limit_per_s is not None and self._tokens is not None:
            self._tokens -= 1.0

    def accept_create(
        self, request: CreateRequest, client_request_id: str | None, *, dropped: bool
    ) -> Generation:
        """Create a generation (credits charged) and start its encode unless it is fated to fail.

        The account's checks (revoked key, quota, rate limit, credit limit) are made under the same
        lock as the create, so concurrent creates cannot all pass them before any is counted. A 429
        is counted in the stats here. Raises `CreateRefused`.
        """
        now = time.time()
        credits = credits_for(request.resolution, request.duration)
        with self._lock:
            refusal = self._refusal(credits, now)
            if refusal is not None:
                if refusal.limit is not None:
                    self._served_429[refusal.limit] += 1
                raise refusal
            self._consume_limits()
            fails = self._rng["outcomes"].random() < self.faults.error_rate
            jitter = self.config.latency_jitter_s
            latency = max(0.0, self.config.latency_s + self._rng["jitter"].uniform(-jitter, jitter))
            recipe = None if fails else self._shared_media(recipe_for(request, self.config.small_frames))
            generation = Generation(
                id=new_generation_id(),
                body_hash=request.body_sha256,
                resolution=request.resolution,
                duration=request.duration,
                recipe=recipe,
                created_at=now,
                generating_at=now + latency * self.config.queued_fraction,
                completes_at=now + latency,
                fails=fails,
                credits_used=credits,
                client_request_id=client_request_id,
                response_dropped=dropped,
            )
            self._generations[generation.id] = generation
            self._creates_by_body[request.body_sha256] += 1
        if recipe is not None:
            self.videos.prepare(recipe)  # encode now, so the video is ready by completion
        return generation

    def _shared_media(self, recipe: VideoRecipe) -> VideoRecipe:
        # A generation keeps its recipe (to re-encode after a cache eviction); generations of the
        # same image or audio share one buffer instead of one copy each.
        image = self._media.setdefault(recipe.image_identity, recipe.image) if recipe.image else None
        audio = (
            self._media.setdefault(recipe.audio_identity, recipe.audio_data) if recipe.audio_data else None
        )
        return replace(recipe, image=image, audio_data=audio)

    def poll(self, generation_id: str) -> tuple[Generation, str]:
        """Count a successful poll; return the generation and its status now."""
        with self._lock:
            generation = self._find(generation_id)
            generation.polls += 1
            return generation, generation.status(time.time())

    def video_url(self, generation: Generation, base_url: str) -> str:
        """The current signed URL; a fresh one (later Expires) once the previous one has expired."""
        now = time.time()
        with self._lock:
            if generation.url_expires is None or now >= generation.url_expires:
                generation.url_expires = math.ceil(now + self.config.url_ttl_s)
            expires = generation.url_expires
        signature = self._sign(generation.id, expires)
        return f"{base_url}/_emulator/videos/{generation.id}.mp4?Expires={expires}&Signature={signature}"

    def authorize_download(
        self, generation_id: str, expires: str | None, signature: str | None
    ) -> VideoRecipe:
        """The recipe behind a signed URL; UnknownGeneration (404) or DownloadRefused (403)."""
        with self._lock:
            generation = self._find(generation_id)
            if generation.status(time.time()) != "completed" or generation.recipe is None:
                raise UnknownGeneration(generation_id)
        if not expires or not expires.isdigit() or not signature:
            raise DownloadRefused("Expires and Signature are required")
        if not hmac.compare_digest(signature, self._sign(generation_id, int(expires))):
            raise DownloadRefused("The request signature does not match")
        if time.time() >= int(expires):
            raise DownloadRefused("Request has expired")
        return generation.recipe

    def _sign(self, generation_id: str, expires: int) -> str:
        mac = hmac.new(self._url_key, f"{generation_id}:{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def _find(self, generation_id: str) -> Generation:
        try:
            return self._generations[generation_id]
        except KeyError:
            raise UnknownGeneration(generation_id) from None

    # -- counters --------------------------------------------------------------------------------

    def _limits_now(self) -> dict[str, Any]:
        """The rate limit's tokens and the quota's use (lock held)."""
        faults, limits = self.faults, {}
        if faults.create_rate_limit_per_s is not None:
            limits["rate_limit_tokens"] = round(self._bucket_tokens(), 3)
        if faults.create_quota is not None:
            index, ends_at = self._quota_window_now(time.time())
            limits |= {"quota_used": self._quota_used, "quota_window": index, "quota_window_ends_at": ends_at}
        return limits

    def count_request(self, route: str, outcome: str) -> None:
        with self._lock:
            self._requests[route][outcome] += 1

    def stats(self) -> dict[str, Any]:
        now = time.time()
        with self._lock:
            generations = {
                g.id: {
                    "status": g.status(now),
                    "created_at": g.created_at,
                    "completes_at": g.completes_at,
                    "body_hash": g.body_hash,
                    "client_request_id": g.client_request_id,
                    "polls": g.polls,
                    "credits_used": g.credits_used,
                    "resolution": g.resolution,
                    "duration": g.duration,
                    "response_dropped": g.response_dropped,
                }
                for g in self._generations.values()
            }
            return {
                "requests": {route: dict(counts) for route, counts in self._requests.items()},
                "creates_by_body_hash": dict(self._creates_by_body),
                "generations": generations,
                "accepted_creates": len(generations),
                # Every accepted create is charged, whatever its answer was (500/504 after create, drop).
                "credits_charged": sum(g["credits_used"] for g in generations.values()),
                "encodes": self.videos.encodes,
                # 429s served on create, by cause, and where the limits stand.
                "create_429s": dict(self._served_429),
                "limits": self._limits_now(),
                "faults": asdict(self.faults),
            }
