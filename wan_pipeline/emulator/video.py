"""Real mp4s for emulated generations: a slow pan across the source image, H.264 plus optional AAC.

Cheap by construction: the source is scaled once to a slightly enlarged frame and converted to
yuv420p once; every output frame is a moving crop of those planes (no per-frame scaling or colour
conversion), encoded by x264 `ultrafast` at a high CRF. Encodes run on a small thread pool, are
shared between generations with the same recipe, and are kept in an in-memory LRU (and optionally
on disk), so hundreds of generations over a handful of images cost a handful of encodes.
"""

from __future__ import annotations

import hashlib
import io
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageOps

from wan_pipeline.emulator.validation import CreateRequest
from wan_pipeline.models import canonical_json
from wan_pipeline.storage import atomic_writer

FPS = 30  # upstream output rate
# Benchmark mode keeps the requested frame size (so the pipeline's checks still hold) and encodes
# only this many frames per second: hundreds of generations then cost little CPU to encode and verify.
SMALL_FPS = 2
LONG_SIDE = {720: 1280, 1080: 1920}
PAN_MARGIN = 1.1  # the source is enlarged by 10% and the frame pans across the excess
AUDIO_RATE = 48_000
AUDIO_FRAME_SAMPLES = 1024  # one AAC frame
TONE_HZ = 440.0
CRF = "32"
METADATA_COMMENT = "wan-pipeline emulator"
# A remote image_url cannot be fetched offline: a generated landscape placeholder stands in for it.
PLACEHOLDER_SIZE = (1280, 720)
MEMORY_CACHE_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class VideoRecipe:
    """Everything that decides the bytes of one encode; equal recipes share one encode."""

    image_identity: str  # sha256 of the image, or "url:<sha256 of the URL>" for a placeholder
    width: int
    height: int
    fps: int
    duration_s: int
    audio: str  # "none" | "tone" | "supplied"
    audio_identity: str | None = None
    image: bytes | None = field(default=None, repr=False, compare=False)  # None: draw the placeholder
    audio_data: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def cache_key(self) -> str:
        identity = {
            "image": self.image_identity,
            "size": [self.width, self.height],
            "fps": self.fps,
            "duration": self.duration_s,
            "audio": [self.audio, self.audio_identity],
            "encoder": [CRF, PAN_MARGIN, TONE_HZ],
        }
        return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:32]


def frame_size(resolution: str, source_width: int, source_height: int) -> tuple[int, int]:
    """Short side from the resolution; landscape unless the source is portrait."""
    short = int(resolution.removesuffix("p"))
    long = LONG_SIDE[short]
    return (long, short) if source_width >= source_height else (short, long)


def recipe_for(request: CreateRequest, small_frames: bool) -> VideoRecipe:
    if request.image is not None:
        image_identity, image = request.image.info.sha256, request.image.data
        source_size = (request.image.info.width or 0, request.image.info.height or 0)
    else:
        image_identity = "url:" + hashlib.sha256(str(request.image_remote_url).encode()).hexdigest()
        image, source_size = None, PLACEHOLDER_SIZE
    if request.audio is not None:
        audio, audio_identity, audio_data = "supplied", request.audio.info.sha256, request.audio.data
    else:
        # A remote audio_url cannot be fetched offline: a tone stands in for it.
        audio, audio_identity, audio_data = ("tone" if request.has_audio else "none"), None, None
    width, height = frame_size(request.resolution, *source_size)
    return VideoRecipe(
        image_identity=image_identity,
        width=width,
        height=height,
        fps=SMALL_FPS if small_frames else FPS,
        duration_s=request.duration,
        audio=audio,
        audio_identity=audio_identity,
        image=image,
        audio_data=audio_data,
    )


def _even(value: float) -> int:
    return int(math.ceil(value / 2)) * 2


def placeholder_image(identity: str, size: tuple[int, int]) -> Image.Image:
    """A deterministic gradient with a grid (so the pan is visible), coloured by the identity."""
    digest = hashlib.sha256(identity.encode()).digest()
    ramp = Image.linear_gradient("L").resize(size)
    channels = [ramp.point(lambda v, k=k: (v * digest[k]) // 255 + (255 - digest[k]) // 3) for k in range(3)]
    image = Image.merge("RGB", channels)
    draw = ImageDraw.Draw(image)
    step = max(size) // 16
    for x in range(0, size[0], step):
        draw.line([(x, 0), (x, size[1])], fill=(255, 255, 255), width=max(1, step // 24))
    for y in range(0, size[1], step):
        draw.line([(0, y), (size[0], y)], fill=(255, 255, 255), width=max(1, step // 24))
    return image


def _enlarged_planes(recipe: VideoRecipe) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Y, U, V planes of the source cover-fitted to the enlarged frame (done once per encode)."""
    size = (_even(recipe.width * PAN_MARGIN), _even(recipe.height * PAN_MARGIN))
    if recipe.image is None:
        enlarged = placeholder_image(recipe.image_identity, size)
    else:
        with Image.open(io.BytesIO(recipe.image)) as source:
            enlarged = ImageOps.fit(source.convert("RGB"), size)
    width, height = size
    yuv = av.VideoFrame.from_image(enlarged).reformat(format="yuv420p").to_ndarray()
    chroma = yuv[height:].reshape(-1)
    quarter = (width // 2) * (height // 2)
    return (
        yuv[:height],
        chroma[:quarter].reshape(height // 2, width // 2),
        chroma[quarter:].reshape(height // 2, width // 2),
    )


def _video_frames(recipe: VideoRecipe) -> Iterator[av.VideoFrame]:
    """A diagonal pan from the top-left to the bottom-right of the enlarged image, on even offsets."""
    y_plane, u_plane, v_plane = _enlarged_planes(recipe)
    width, height = recipe.width, recipe.height
    travel_x, travel_y = y_plane.shape[1] - width, y_plane.shape[0] - height
    count = recipe.fps * recipe.duration_s
    for index in range(count):
        progress = index / max(count - 1, 1)
        x, y = int(travel_x * progress) // 2 * 2, int(travel_y * progress) // 2 * 2
        planes = (
            y_plane[y : y + height, x : x + width],
            u_plane[y // 2 : (y + height) // 2, x // 2 : (x + width) // 2],
            v_plane[y // 2 : (y + height) // 2, x // 2 : (x + width) // 2],
        )
        packed = np.concatenate([plane.reshape(-1) for plane in planes]).reshape(height * 3 // 2, width)
        frame = av.VideoFrame.from_ndarray(packed, format="yuv420p")
        frame.pts = index
        yield frame


def _audio_samples(recipe: VideoRecipe) -> np.ndarray:
    """Mono float32 samples lasting exactly the video's duration."""
    total = AUDIO_RATE * recipe.duration_s
    if recipe.audio == "tone":
        t = np.arange(total, dtype=np.float32) / AUDIO_RATE
        fade = np.minimum(1.0, np.minimum(t, recipe.duration_s - t) / 0.25)  # no clicks at the ends
        return (0.2 * fade * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32)
    # Supplied audio: resampled to mono, cut at the video's end or padded with silence.
    resampler = av.AudioResampler(format="fltp", layout="mono", rate=AUDIO_RATE)
    chunks: list[np.ndarray] = []
    with av.open(io.BytesIO(recipe.audio_data or b"")) as container:
        for decoded in container.decode(audio=0):
            chunks.extend(frame.to_ndarray()[0] for frame in resampler.resample(decoded))
    chunks.extend(frame.to_ndarray()[0] for frame in resampler.resample(None))
    samples = np.concatenate(chunks).astype(np.float32)[:total] if chunks else np.zeros(0, np.float32)
    return np.pad(samples, (0, total - samples.size))


def _audio_frames(samples: np.ndarray) -> Iterator[av.AudioFrame]:
    for start in range(0, samples.size, AUDIO_FRAME_SAMPLES):
        frame = av.AudioFrame.from_ndarray(
            samples[start : start + AUDIO_FRAME_SAMPLES].reshape(1, -1), format="fltp", layout="mono"
        )
        frame.sample_rate = AUDIO_RATE
        frame.pts = start
        yield frame


def encode_mp4(recipe: VideoRecipe) -> bytes:
    """Encode one recipe to mp4 bytes: exactly fps * duration frames, audio cut to the same length."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        container.metadata["comment"] = METADATA_COMMENT
        container.metadata["description"] = (
            f"emulated output; image {recipe.image_identity}; audio {recipe.audio} {recipe.audio_identity or ''}"
        ).strip()
        video = container.add_stream(
            # A keyframe every second, as real outputs have: checking a file's tail decodes one second.
            "libx264",
            rate=recipe.fps,
            options={"preset": "ultrafast", "crf": CRF, "threads": "1", "g": str(recipe.fps)},
        )
        video.width, video.height, video.pix_fmt = recipe.width, recipe.height, "yuv420p"
        audio_stream, audio_frames = None, iter(())
        if recipe.audio != "none":
            audio_stream = container.add_stream("aac", rate=AUDIO_RATE, layout="mono")
            audio_frames = _audio_frames(_audio_samples(recipe))
        pending_audio = next(audio_frames, None)
        for frame in _video_frames(recipe):
            # Interleave: the audio that starts before this video frame is muxed first.
            while pending_audio is not None and pending_audio.pts * recipe.fps <= frame.pts * AUDIO_RATE:
                container.mux(audio_stream.encode(pending_audio))
                pending_audio = next(audio_frames, None)
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if audio_stream is not None:
            while pending_audio is not None:
                container.mux(audio_stream.encode(pending_audio))
                pending_audio = next(audio_frames, None)
            container.mux(audio_stream.encode(None))
    return buffer.getvalue()


class _BytesLru:
    """An LRU of encodes bounded by total size."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0

    def get(self, key: str) -> bytes | None:
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
        return data

    def put(self, key: str, data: bytes) -> None:
        if key in self._items or len(data) > self.budget:
            return
        self._items[key] = data
        self._size += len(data)
        while self._size > self.budget:
            _, evicted = self._items.popitem(last=False)
            self._size -= len(evicted)


class VideoFactory:
    """Encodes recipes in background threads; one encode per recipe at a time, results cached.

    Generations keep recipes, not bytes: `prepare` starts an encode at create time, `fetch` returns
    the bytes at download time (waiting for a running encode, re-encoding after an eviction).
    """

    def __init__(
        self, cache_dir: str | Path | None = None, *, workers: int = 2, memory_bytes: int = MEMORY_CACHE_BYTES
    ):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._memory = _BytesLru(memory_bytes)
        self._in_flight: dict[str, Future[bytes]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="emulator-encode")
        self.encodes = 0  # encodes actually run (cache misses)

    def fetch(self, recipe: VideoRecipe) -> Future[bytes]:
        key = recipe.cache_key
        with self._lock:
            cached = self._memory.get(key)
            if cached is not None:
                done: Future[bytes] = Future()
                done.set_result(cached)
                return done
            job = self._in_flight.get(key)
            if job is None:
                job = self._pool.submit(self._produce, recipe, key)
                self._in_flight[key] = job
                job.add_done_callback(lambda _: self._forget(key))
            return job

    def prepare(self, recipe: VideoRecipe) -> None:
        """Start (or join) the encode in the background without waiting for it."""
        self.fetch(recipe)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _forget(self, key: str) -> None:
        with self._lock:
            self._in_flight.pop(key, None)

    def _produce(self, recipe: VideoRecipe, key: str) -> bytes:
        disk_path = self.cache_dir / f"{key}.mp4" if self.cache_dir is not None else None
        if disk_path is not None and disk_path.is_file():
            data = disk_path.read_bytes()
        else:
            data = encode_mp4(recipe)
            with self._lock:
                self.encodes += 1
            if disk_path is not None:
                with atomic_writer(str(disk_path)) as handle:
                    handle.write(data)
        with self._lock:
            self._memory.put(key, data)
        return data
