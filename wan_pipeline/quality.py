"""Quality checks on a generated video: pure functions over PyAV, numpy and Pillow (no models).

What a wasted generation looks like, measured cheaply on small grey frames:

- **first-frame fidelity**: Wan i2v promises that the source image is the first frame. The first
  frame and the image (cover-fitted to the video's aspect) are shrunk to `FIDELITY_LONG_SIDE` px and
  compared with a structural similarity (SSIM, 7x7 windows) and a PSNR;
- **motion**: the mean absolute grey-level difference (0-255) between consecutive sampled frames; a
  frozen video scores ~0. A video frozen for part of its length (a mean can still pass) is caught by
  its longest frozen stretch: consecutive samples that change less than `min_motion`;
- **black or blank stretches**: sampled frames that are dark (mean level below `black_level`) or
  flat (standard deviation below `flat_std`), as the longest run in seconds;
- **audio**: present and not silent (RMS in dBFS) when audio was asked for, absent when it was not.
  The RMS is over the whole track when it is short (up to AUDIO_WINDOWS x (AUDIO_WINDOW_FRAMES + 1)
  codec frames), else over AUDIO_WINDOWS stretches spread evenly from its start to its end.

Sampling keeps the cost per video small beside its download (benchmark figure 7):
- only keyframes are decoded (real outputs and the emulator's have one every second), at most one
  every `MIN_SAMPLE_INTERVAL_S`: found in the container's index, each is decoded alone after a seek
  (no other packet is read); a file with too few keyframes is decoded in full and sampled evenly;
- frames are shrunk from their luma plane straight to grey (swscale, box average), never to RGB;
- the keyframes `media.probe_video` decoded anyway (the first frame, the last second's) are taken
  from it when the probe of the same file came just before (`media.take_probed_keyframes`);
- the container is opened without FFmpeg's probing decodes (`FAST_OPEN`), the source image is
  decoded once per size (JPEG at a reduced scale) and kept for the next videos of the same image.

Every threshold is a field of `QualityThresholds`, overridable through `WAN_PIPELINE_QUALITY_*`
environment variables (see `QualityThresholds.from_env`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import av
import av.error
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image, ImageOps
from upath import UPath

from wan_pipeline.media import (
    LUMA_LONG_SIDE,
    MediaDecodeError,
    VideoPath,
    small_luma,
    small_size,
    take_probed_keyframes,
)

ANALYSIS_LONG_SIDE = LUMA_LONG_SIDE  # px: sampled frames are compared at this size (96: noise vanishes)
FIDELITY_LONG_SIDE = 32  # px: the first frame against the image (a few % of crop or zoom vanish too)
MIN_SAMPLE_INTERVAL_S = 0.5  # at most two sampled frames per second
MIN_KEYFRAME_SAMPLES = 3  # fewer keyframes than this over a video longer than 1.5 s: decode every frame
FALLBACK_SAMPLES_PER_S = 2.0
SSIM_WINDOW = 7
MAX_REORDER_S = 0.25  # a keyframe is shown at most this long after its decoding time
# Opening: the mp4 header already declares every stream, yet FFmpeg would read and decode frames to
# guess parameters (pixel format, decoder delay): a 1080p keyframe or seven frames, most of the cost
# of opening. Only its probing decoders see skip_frame; the ones that decode samples are separate.
FAST_OPEN = {"probesize": "32", "skip_frame": "all"}
AUDIO_WINDOWS = 8  # a longer track is measured over this many stretches spread evenly...
AUDIO_WINDOW_FRAMES = 4  # ...of this many codec frames each (AAC: 1024 samples, 21 ms at 48 kHz)
IMAGE_CACHE_ENTRIES = 64  # source images kept as small grey arrays (a few KB each)
_IMAGE_CACHE: OrderedDict[tuple[bytes, tuple[int, int]], np.ndarray] = OrderedDict()
_IMAGE_CACHE_LOCK = threading.Lock()  # collection measures several videos at once, in threads
SILENCE_FLOOR_DBFS = -120.0  # what an all-zero track measures

ENV_PREFIX = "WAN_PIPELINE_QUALITY_"


@dataclass(frozen=True)
class QualityThresholds:
    """When a video fails a check. Environment: `WAN_PIPELINE_QUALITY_<FIELD>` (upper case)."""

    min_first_frame_ssim: float = 0.45  # SSIM of the first frame against the source image (-1..1)
    min_motion: float = 0.5  # mean abs grey difference between sampled frames (0..255)
    black_level: float = 20.0  # a frame darker than this on average (0..255) is black
    flat_std: float = 3.0  # a frame whose grey levels vary less than this is blank
    max_blank_s: float = 1.0  # longest tolerated black/blank stretch, seconds
    max_frozen_s: float = 1.5  # longest tolerated stretch changing less than min_motion, seconds
    min_audio_dbfs: float = -50.0  # a requested track quieter than this (RMS) is silent

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> QualityThresholds:
        env = os.environ if environ is None else environ
        values: dict[str, float] = {}
        for item in fields(cls):
            name = ENV_PREFIX + item.name.upper()
            raw = env.get(name)
            if raw:
                try:
                    values[item.name] = float(raw)
                except ValueError:
                    raise ValueError(f"{name}={raw!r} is not a number") from None
        return cls(**values)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class SampledVideo:
    """Small grey frames taken from a video, with their times, and its audio loudness."""

    times: list[float]
    frames: list[np.ndarray]  # float32, values 0..255, all the same shape
    duration_s: float
    keyframes_only: bool
    has_audio: bool
    audio_rms_dbfs: float | None  # None: no audio track


@dataclass(frozen=True)
class QualityReport:
    first_frame_ssim: float | None  # None: no local source image to compare with
    first_frame_psnr_db: float | None
    motion: float | None  # None: fewer than two sampled frames
    longest_frozen_s: float
    longest_blank_s: float
    blank_fraction: float
    has_audio: bool
    audio_rms_dbfs: float | None
    samples: int
    failures: list[str] = field(default_factory=list)  # one sentence per failed check

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def _grey(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114).astype(np.float32)


def image_grey(image: Image.Image | bytes | VideoPath, size: tuple[int, int]) -> np.ndarray:
    """The source image cover-fitted to `size` (centre crop, as a video of another aspect shows it).

    Bytes are remembered (by their sha1, with `size`) for the next videos of the same image: a grid
    has many videos per source image, and decoding a large PNG costs more than the checks."""
    if isinstance(image, Image.Image):
        return _fit_grey(image, size)
    data = image if isinstance(image, bytes) else UPath(image).read_bytes()
    key = (hashlib.sha1(data, usedforsecurity=False).digest(), size)
    with _IMAGE_CACHE_LOCK:
        cached = _IMAGE_CACHE.get(key)
        if cached is not None:
            _IMAGE_CACHE.move_to_end(key)
            return cached
    with Image.open(io.BytesIO(data)) as picture:
        # A JPEG decodes straight at 1/2 to 1/8 scale when that still covers `size` (no loss here).
        picture.draft("RGB", (size[0] * 2, size[1] * 2))
        grey = _fit_grey(picture, size)
    grey.setflags(write=False)
    with _IMAGE_CACHE_LOCK:
        _IMAGE_CACHE[key] = grey
        while len(_IMAGE_CACHE) > IMAGE_CACHE_ENTRIES:
            _IMAGE_CACHE.popitem(last=False)
    return grey


def _fit_grey(picture: Image.Image, size: tuple[int, int]) -> np.ndarray:
    fitted = ImageOps.fit(picture.convert("RGB"), size, Image.Resampling.BILINEAR)
    return _grey(np.asarray(fitted, dtype=np.float32))


def _shrink(grey: np.ndarray, long_side: int) -> np.ndarray:
    height, width = grey.shape
    if max(width, height) <= long_side:
        return grey
    image = Image.fromarray(grey.astype(np.float32), mode="F").resize(small_size(width, height, long_side), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float32)


def _audio_rms_dbfs(sum_squares: float, count: int) -> float:
    if count == 0 or sum_squares <= 0:
        return SILENCE_FLOOR_DBFS
    return max(SILENCE_FLOOR_DBFS, 20 * math.log10(math.sqrt(sum_squares / count)))


@contextlib.contextmanager
def _open_input(path: VideoPath) -> Iterator[av.container.InputContainer]:
    """`path` (local or fsspec) opened for reading; FFmpeg errors become MediaDecodeError."""
    name = str(path)
    with UPath(path).open("rb") as handle:
        try:
            with av.open(handle, mode="r", metadata_errors="replace", options=FAST_OPEN) as container:
                if not container.streams.video:
                    raise MediaDecodeError(f"{name}: no video stream")
                yield container
        except av.error.FFmpegError as exc:
            raise MediaDecodeError(f"{name}: not a decodable video ({exc.strerror or exc})") from exc


def _seconds(timestamp: int | None, start: int, time_base: Any) -> float:
    return float(((timestamp or 0) - start) * time_base) if time_base else 0.0


def _sample_keyframes(
    container: Any, video: Any, timestamps: list[int], size: tuple[int, int], probed: dict[float, np.ndarray]
) -> tuple[list[float], list[np.ndarray]]:
    """Seek to each keyframe of `timestamps` (index timestamps: decoding order) and decode that one
    packet; no other frame of the video is read. A keyframe in `probed` (the probe of this file
    decoded it already) is taken from there."""
    start, time_base = video.start_time or 0, video.time_base
    # A keyframe is shown at its decoding time, or a few frames later when the stream reorders.
    probed_times = sorted(probed)
    context = video.codec_context
    context.thread_count = 1  # one frame at a time: decoder threads would only add start-up cost
    context.skip_frame = "NONKEY"  # were a packet other than a keyframe decoded, it would cost nothing
    context.options = {"skip_loop_filter": "all"}  # deblocking is invisible at ANALYSIS_LONG_SIDE px
    scaler = VideoReformatter()  # one scaler set-up for every frame of this video
    times: list[float] = []
    frames: list[np.ndarray] = []
    for timestamp in timestamps:
        decoded_at = _seconds(timestamp, start, time_base)
        known = next((t for t in probed_times if decoded_at - 1e-6 <= t < decoded_at + MAX_REORDER_S), None)
        if known is not None:
            if not times or known > times[-1]:
                times.append(known)
                frames.append(probed[known])
            continue
        # Forward: a keyframe's presentation time is at or after its index (decoding) time.
        container.seek(timestamp, stream=video, backward=False)  # also resets the decoder
        decoded: list[av.VideoFrame] = []
        for packet in container.demux(video):
            if packet.size == 0:
                break
            if packet.is_keyframe and (packet.dts is None or packet.dts >= timestamp):
                # The keyframe alone, then drain: a decoder that reorders (B-frames) would otherwise
                # wait for the frames after it.
                decoded = packet.decode() or context.decode(None)
                break
        for frame in decoded[:1]:
            at = _seconds(frame.pts, start, time_base)
            if not times or at > times[-1]:
                times.append(at)
                frames.append(small_luma(frame, size, scaler))
    return times, frames


def _sample_sequentially(
    container: Any, video: Any, keyframes_only: bool, size: tuple[int, int]
) -> tuple[list[float], list[np.ndarray]]:
    """Demux the video stream from its start: keyframe packets only (a file without an index), or
    every frame decoded and sampled `FALLBACK_SAMPLES_PER_S` times a second."""
    start, time_base = video.start_time or 0, video.time_base
    fps = float(video.average_rate) if video.average_rate else 30.0
    interval = MIN_SAMPLE_INTERVAL_S if keyframes_only else 1 / FALLBACK_SAMPLES_PER_S
    stride = max(1, round(fps * interval))
    scaler = VideoReformatter()
    times: list[float] = []
    frames: list[np.ndarray] = []
    next_at, index = -1.0, 0
    container.seek(start, stream=video, backward=True)
    for packet in container.demux(video):
        if packet.size == 0:
            decoded = packet.decode()  # flush
        elif keyframes_only:
            if not packet.is_keyframe or _seconds(packet.pts, start, packet.time_base) < next_at:
                continue  # never decoded: that is where the time is saved
            decoded = packet.decode()
        else:
            decoded = packet.decode()
        for frame in decoded:
            at = _seconds(frame.pts, start, time_base)
            if keyframes_only or index % stride == 0:
                times.append(at)
                frames.append(small_luma(frame, size, scaler))
                next_at = at + interval
            index += 1
    return times, frames


def _audio_windows(count: int) -> list[tuple[int, int]]:
    """(first packet, packets) of the stretches of an audio track whose loudness is measured."""
    length = AUDIO_WINDOW_FRAMES + 1  # the first frame after a jump is dropped (see _audio_rms)
    if count <= AUDIO_WINDOWS * length:
        return [(0, count)]
    last = count - length
    return [(round(i * last / (AUDIO_WINDOWS - 1)), length) for i in range(AUDIO_WINDOWS)]


def _audio_rms(container: Any, audio: Any) -> float:
    """RMS (dBFS) of the track: all of it when short, else `AUDIO_WINDOWS` stretches spread evenly
    over it, `AUDIO_WINDOW_FRAMES` codec frames each (a bounded cost, whatever the duration)."""
    entries = audio.index_entries
    count = len(entries)
    windows = _audio_windows(count) if count else [(0, -1)]  # no index: the whole track
    sum_squares, sample_count = 0.0, 0
    for first, length in windows:
        whole = first == 0 and length in (-1, count)
        target = entries[first].timestamp if count else (audio.start_time or 0)
        container.seek(target, stream=audio, backward=True)  # also resets the decoder
        read = 0
        for packet in container.demux(audio):
            if packet.size == 0 or (length != -1 and read >= length):
                break
            read += 1
            for chunk in packet.decode():
                # After a jump the decoder lacks the previous frame it overlaps with: that first frame
                # comes out partly silent, so it is not counted (except at the very start).
                if read == 1 and not whole:
                    continue
                raw = chunk.to_ndarray()
                samples = raw.reshape(-1).astype(np.float64)
                if raw.dtype.kind in "iu":
                    samples /= np.iinfo(raw.dtype).max
                sum_squares += float(samples @ samples)
                sample_count += samples.size
    return _audio_rms_dbfs(sum_squares, sample_count)


def _selected_keyframes(video: Any) -> list[int] | None:
    """Timestamps of the keyframes to sample (at most one every MIN_SAMPLE_INTERVAL_S), from the
    container's index; None when the container has no index."""
    entries = video.index_entries
    if not len(entries):
        return None
    start, time_base = video.start_time or 0, video.time_base
    selected: list[int] = []
    next_at = -1.0
    for entry in entries:
        if entry.is_keyframe and not entry.is_discard:
            at = _seconds(entry.timestamp, start, time_base)
            if at >= next_at:
                selected.append(entry.timestamp)
                next_at = at + MIN_SAMPLE_INTERVAL_S
    return selected


def sample_video(path: VideoPath, *, long_side: int = ANALYSIS_LONG_SIDE) -> SampledVideo:
    """Sampled small grey frames of a video (keyframes, else every frame sampled) and its audio RMS.

    Keyframes are found in the container's index and each is decoded alone after a seek; a file with
    fewer than MIN_KEYFRAME_SAMPLES over more than 1.5 s is decoded in full and sampled evenly.
    """
    with _open_input(path) as container:
        video = container.streams.video[0]
        audio = container.streams.audio[0] if container.streams.audio else None
        if video.duration and video.time_base:
            duration_s = float(video.duration * video.time_base)
        else:
            duration_s = (container.duration or 0) / av.time_base
        size = small_size(video.width, video.height, long_side)
        selected = _selected_keyframes(video)
        if selected is not None and (len(selected) >= MIN_KEYFRAME_SAMPLES or duration_s <= 1.5):
            keyframes_only = True
            probed = take_probed_keyframes(path) if long_side == LUMA_LONG_SIDE else {}
            times, frames = _sample_keyframes(container, video, selected, size, probed)
        else:
            times, frames, keyframes_only = [], [], selected is None
            if selected is None:  # no index: read the keyframes in order
                times, frames = _sample_sequentially(container, video, True, size)
            if len(frames) < MIN_KEYFRAME_SAMPLES and duration_s > 1.5:  # too few keyframes: every frame
                keyframes_only = False
                times, frames = _sample_sequentially(container, video, False, size)
        audio_rms = _audio_rms(container, audio) if audio is not None else None
    if not frames:
        raise MediaDecodeError(f"{path}: no decodable video frame")
    order = np.argsort(times, kind="stable")
    return SampledVideo(
        times=[times[i] for i in order],
        frames=[frames[i] for i in order],
        duration_s=duration_s,
        keyframes_only=keyframes_only,
        has_audio=audio is not None,
        audio_rms_dbfs=audio_rms,
    )


def _box_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean over every `window` x `window` block (valid positions only), via an integral image."""
    padded = np.pad(values.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = padded[window:, window:] - padded[:-window, window:] - padded[window:, :-window] + padded[:-window, :-window]
    return sums / (window * window)


def ssim(a: np.ndarray, b: np.ndarray, *, window: int = SSIM_WINDOW) -> float:
    """Mean structural similarity of two grey images of one shape (0..255), uniform windows."""
    if a.shape != b.shape:
        raise ValueError(f"ssim needs images of one shape, got {a.shape} and {b.shape}")
    window = min(window, *a.shape)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = _box_mean(a, window), _box_mean(b, window)
    var_a = _box_mean(a * a, window) - mu_a * mu_a
    var_b = _box_mean(b * b, window) - mu_b * mu_b
    cov = _box_mean(a * b, window) - mu_a * mu_b
    score = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(score.mean())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _longest_run(flags: Sequence[bool], starts: Sequence[float], ends: Sequence[float]) -> float:
    """The longest total duration of consecutive flagged spans (`starts[i]`..`ends[i]`), seconds."""
    longest = current = 0.0
    for flagged, start, end in zip(flags, starts, ends, strict=True):
        current = current + (end - start) if flagged else 0.0
        longest = max(longest, current)
    return longest


def _blank_runs(sampled: SampledVideo, thresholds: QualityThresholds) -> tuple[float, float]:
    """(longest black/blank stretch in seconds, fraction of sampled frames that are black/blank)."""
    blank = [
        float(f.mean()) < thresholds.black_level or float(f.std()) < thresholds.flat_std for f in sampled.frames
    ]
    # A sample stands for the time until the next one (the last: until the end of the video).
    ends = sampled.times[1:] + [max(sampled.duration_s, sampled.times[-1])]
    return _longest_run(blank, sampled.times, ends), sum(blank) / len(blank)


def assess_sampled(
    sampled: SampledVideo,
    *,
    source_image: Image.Image | bytes | VideoPath | None,
    expect_audio: bool,
    thresholds: QualityThresholds | None = None,
) -> QualityReport:
    thresholds = thresholds or QualityThresholds()
    failures: list[str] = []
    first_ssim = first_psnr = None
    if source_image is not None:
        first = _shrink(sampled.frames[0], FIDELITY_LONG_SIDE)
        reference = image_grey(source_image, (first.shape[1], first.shape[0]))
        first_ssim, first_psnr = ssim(first, reference), psnr(first, reference)
        if first_ssim < thresholds.min_first_frame_ssim:
            failures.append(
                f"first frame: SSIM {first_ssim:.3f} against the source image, below {thresholds.min_first_frame_ssim:g}"
            )
    motion, longest_frozen = None, 0.0
    if len(sampled.frames) >= 2:
        changes = [float(np.abs(a - b).mean()) for a, b in zip(sampled.frames, sampled.frames[1:], strict=False)]
        motion = float(np.mean(changes))
        # The span between two samples that barely differ is frozen (a wholly frozen video is
        # reported once, as frozen, not again as a frozen stretch).
        longest_frozen = _longest_run(
            [change < thresholds.min_motion for change in changes], sampled.times[:-1], sampled.times[1:]
        )
        if motion < thresholds.min_motion:
            failures.append(f"motion: {motion:.3f} mean grey change between sampled frames, below {thresholds.min_motion:g} (frozen)")
        elif longest_frozen > thresholds.max_frozen_s:
            failures.append(
                f"motion: frozen for {longest_frozen:.1f} s (sampled frames changing less than "
                f"{thresholds.min_motion:g}), above {thresholds.max_frozen_s:g} s"
            )
    longest_blank, blank_fraction = _blank_runs(sampled, thresholds)
    if longest_blank > thresholds.max_blank_s:
        failures.append(f"blank: {longest_blank:.1f} s black or blank stretch, above {thresholds.max_blank_s:g} s")
    if expect_audio and not sampled.has_audio:
        failures.append("audio: audio was requested, the video has no audio track")
    elif expect_audio and (sampled.audio_rms_dbfs or SILENCE_FLOOR_DBFS) < thresholds.min_audio_dbfs:
        failures.append(f"audio: silent ({sampled.audio_rms_dbfs:.1f} dBFS RMS, below {thresholds.min_audio_dbfs:g})")
    elif not expect_audio and sampled.has_audio:
        failures.append("audio: no audio was requested, the video has an audio track")
    return QualityReport(
        first_frame_ssim=None if first_ssim is None else round(first_ssim, 4),
        first_frame_psnr_db=None if first_psnr is None else round(first_psnr, 2),
        motion=None if motion is None else round(motion, 3),
        longest_frozen_s=round(longest_frozen, 3),
        longest_blank_s=round(longest_blank, 3),
        blank_fraction=round(blank_fraction, 3),
        has_audio=sampled.has_audio,
        audio_rms_dbfs=None if sampled.audio_rms_dbfs is None else round(sampled.audio_rms_dbfs, 2),
        samples=len(sampled.frames),
        failures=failures,
    )


def assess_video(
    path: VideoPath,
    *,
    source_image: Image.Image | bytes | VideoPath | None,
    expect_audio: bool,
    thresholds: QualityThresholds | None = None,
) -> QualityReport:
    """Every quality metric of one video, and the checks it fails (see the module docstring)."""
    return assess_sampled(sample_video(path), source_image=source_image, expect_audio=expect_audio, thresholds=thresholds)


@dataclass(frozen=True)
class Closeness:
    """How close a reproduction came to the original, over frames aligned in time."""

    identical_bytes: bool
    aligned_frames: int
    mean_ssim: float
    min_ssim: float
    mean_abs_diff: float  # grey levels, 0..255

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.identical_bytes:
            return "identical: the reproduction is byte for byte the original video"
        return (
            f"frame similarity over {self.aligned_frames} aligned frames: mean SSIM {self.mean_ssim:.3f} "
            f"(lowest {self.min_ssim:.3f}), mean grey difference {self.mean_abs_diff:.2f}"
        )


def closeness(original: VideoPath, reproduction: VideoPath, *, same_sha256: bool = False) -> Closeness:
    """Frame similarity of two videos: each sampled frame of the original against the reproduction's
    frame nearest in time (both shrunk to the original's analysis size)."""
    a, b = sample_video(original), sample_video(reproduction)
    shape = a.frames[0].shape
    scores, diffs = [], []
    for at, frame in zip(a.times, a.frames, strict=True):
        nearest = int(np.argmin([abs(t - at) for t in b.times]))
        other = b.frames[nearest]
        if other.shape != shape:
            other = np.asarray(
                Image.fromarray(other.astype(np.uint8)).resize((shape[1], shape[0]), Image.Resampling.BILINEAR),
                dtype=np.float32,
            )
        scores.append(ssim(frame, other))
        diffs.append(float(np.abs(frame - other).mean()))
    return Closeness(
        identical_bytes=same_sha256,
        aligned_frames=len(scores),
        mean_ssim=round(float(np.mean(scores)), 4),
        min_ssim=round(float(np.min(scores)), 4),
        mean_abs_diff=round(float(np.mean(diffs)), 3),
    )
