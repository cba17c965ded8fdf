"""Describe downloaded videos: probe them (PyAV), check them against their request, draw previews (Pillow).

Videos are read through universal-pathlib, so a local path and any fsspec URL work alike. A video is
only trusted once its first and its last frames decode: an mp4 whose index sits at the front
("faststart") still opens and reports its full duration when its tail is missing, so header data
alone cannot tell a complete download from a truncated one.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import av
import av.error
import numpy as np
from av.container import InputContainer
from av.packet import Packet
from av.video.frame import VideoFrame
from av.video.reformatter import VideoReformatter
from av.video.stream import VideoStream
from PIL import Image, ImageDraw, ImageFont, ImageOps
from upath import UPath

VideoPath = str | os.PathLike[str] | UPath

TAIL_SECONDS = 1.0  # how far before the end the decode check starts reading
CONTACT_TILE_WIDTH = 320  # px: a contact-sheet tile, unless the caller asks otherwise
TILE_MARGIN = 4  # px around a contact-sheet frame
LABEL_HEIGHT = 18  # px of label strip under each contact-sheet frame
MAX_TILE_ASPECT = 16 / 9  # a frame area is at most this many times taller than wide (portrait 9:16)
SHEET_BACKGROUND = (24, 24, 24)
PLACEHOLDER_FILL = (90, 90, 90)
LABEL_COLOUR = (235, 235, 235)
LUMA_LONG_SIDE = 96  # px: the small grey keyframes the probe keeps for the quality checks
SHRINK_INTERPOLATION = "AREA"  # swscale's box average: no aliasing when 1920 px become 96 (or 312)
# Sheets shrink previews (at most 312 px wide) by a quarter or so: bilinear is as sharp there, and
# five times faster than Lanczos (7.4 s of a 5,000-cell set's sheets, profiled).
SHEET_RESAMPLE = Image.Resampling.BILINEAR
KEYFRAME_MEMO_FILES = 32  # files whose probed keyframes are remembered (a few small arrays each)


class MediaDecodeError(ValueError):
    """A file that is not a usable video: not an mp4, truncated, or undecodable. The message names the file."""


@dataclass(frozen=True)
class VideoProbe:
    width: int
    height: int
    duration_s: float
    fps: float | None
    codec: str
    has_audio: bool
    audio_codec: str | None
    frame_count: int | None
    tags: dict[str, str] = field(default_factory=dict)  # container metadata (encoder, comment...)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def small_size(width: int, height: int, long_side: int = LUMA_LONG_SIDE) -> tuple[int, int]:
    """(width, height) scaled so the long side is `long_side` px (at least 8 px each)."""
    scale = long_side / max(width, height)
    return max(8, round(width * scale)), max(8, round(height * scale))


def small_luma(frame: VideoFrame, size: tuple[int, int], scaler: VideoReformatter | None = None) -> np.ndarray:
    """The frame's luma shrunk to `size`, float32 0-255 (full range), without touching the chroma:
    swscale box-averages the Y plane and expands its range in one step."""
    small = (scaler or VideoReformatter()).reformat(
        frame, width=size[0], height=size[1], format="gray", interpolation=SHRINK_INTERPOLATION
    )
    return small.to_ndarray().astype(np.float32)


# Keyframes `probe_video` decodes anyway (the first frame; those of the last second), kept small and
# grey for the quality checks that follow it on the same file (`take_probed_keyframes`): decoding a
# keyframe is most of what those checks cost. Local files only, keyed by what changes with the bytes.
_KEYFRAME_MEMO: OrderedDict[tuple[Any, ...], dict[float, np.ndarray]] = OrderedDict()
_KEYFRAME_MEMO_LOCK = threading.Lock()  # downloads are probed and checked in several threads


def _file_identity(path: VideoPath) -> tuple[Any, ...] | None:
    target = UPath(path)
    if target.protocol not in ("", "file"):
        return None
    try:
        stat = os.stat(target.path)
    except OSError:
        return None
    return (os.path.realpath(target.path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _remember_keyframes(path: VideoPath, keyframes: dict[float, np.ndarray]) -> None:
    identity = _file_identity(path)
    if identity is None or not keyframes:
        return
    with _KEYFRAME_MEMO_LOCK:
        _KEYFRAME_MEMO[identity] = keyframes
        _KEYFRAME_MEMO.move_to_end(identity)
        while len(_KEYFRAME_MEMO) > KEYFRAME_MEMO_FILES:
            _KEYFRAME_MEMO.popitem(last=False)


def take_probed_keyframes(path: VideoPath) -> dict[float, np.ndarray]:
    """{presentation time s: small grey keyframe (`small_luma` at `LUMA_LONG_SIDE`)} that the last
    `probe_video` of this very file decoded, handed over once; {} when there are none."""
    identity = _file_identity(path)
    if identity is None:
        return {}
    with _KEYFRAME_MEMO_LOCK:
        return _KEYFRAME_MEMO.pop(identity, {})


@contextlib.contextmanager
def _open_video(path: VideoPath) -> Iterator[tuple[InputContainer, VideoStream]]:
    """Open `path` (local or fsspec) and its first video stream; FFmpeg errors become MediaDecodeError.

    A missing file raises the usual FileNotFoundError: that is not a decoding problem.
    """
    name = str(path)
    with UPath(path).open("rb") as handle:
        try:
            # metadata_errors="replace": a badly encoded tag must not make the whole file unreadable.
            with av.open(handle, mode="r", metadata_errors="replace") as container:
                if not container.streams.video:
                    raise MediaDecodeError(f"{name}: no video stream")
                video = container.streams.video[0]
                # One decoder thread: a few frames are decoded per open, and videos are read several
                # at a time, so decoder threads only add their start-up (a third of a probe's time).
                video.codec_context.thread_count = 1
                yield container, video
        except av.error.FFmpegError as exc:
            raise MediaDecodeError(f"{name}: not a decodable video ({exc.strerror or exc})") from exc


def _duration_s(container: InputContainer, video: VideoStream, name: str) -> float:
    # The video stream's own duration is what a viewer sees; the container's also covers audio padding.
    if video.duration and video.time_base:
        return float(video.duration * video.time_base)
    if container.duration:
        return container.duration / av.time_base
    raise MediaDecodeError(f"{name}: the container declares no duration")


def _start_s(item: VideoFrame | Packet, video: VideoStream) -> float:
    """Presentation time of a frame or packet, counted from the start of the stream."""
    return float(((item.pts or 0) - (video.start_time or 0)) * item.time_base)


def _frame_length_s(frame: VideoFrame, fps: float | None) -> float:
    if frame.duration and frame.time_base:
        return float(frame.duration * frame.time_base)
    return 1 / fps if fps else 0.0


def _seek_s(container: InputContainer, video: VideoStream, seconds: float) -> None:
    """Seek to the keyframe at or before `seconds` (counted from the start of the stream)."""
    offset = (video.start_time or 0) + int(seconds / video.time_base)
    container.seek(offset, stream=video, backward=True)


def _check_decodes_to_end(
    container: InputContainer, video: VideoStream, duration_s: float, fps: float | None, name: str,
    keyframes: dict[float, np.ndarray] | None = None,
) -> None:
    """Decode the first frame and every frame of the last `TAIL_SECONDS`; the last must reach the end.

    The keyframes among them go into `keyframes`, small and grey (see `take_probed_keyframes`)."""
    size, scaler = small_size(video.width, video.height), VideoReformatter()

    def keep(frame: VideoFrame) -> None:
        if keyframes is not None and frame.key_frame:
            keyframes[_start_s(frame, video)] = small_luma(frame, size, scaler)

    first = next(container.decode(video), None)
    if first is None:
        raise MediaDecodeError(f"{name}: no decodable video frame")
    keep(first)
    _seek_s(container, video, max(0.0, duration_s - TAIL_SECONDS))
    last: VideoFrame | None = None
    for packet in container.demux(video):
        # The demuxer flags a sample cut short by the end of the file; some decoders still output a frame.
        if packet.is_corrupt:
            raise MediaDecodeError(
                f"{name}: truncated (incomplete video packet at {_start_s(packet, video):.3f} s)"
            )
        for frame in packet.decode():
            keep(frame)
            last = frame
    if last is None:
        raise MediaDecodeError(f"{name}: truncated (no frame decodes in the last {TAIL_SECONDS:g} s)")
    length = _frame_length_s(last, fps)
    reached = _start_s(last, video) + length
    # A complete file reaches its declared duration exactly; allow half a frame of rounding.
    if reached < duration_s - max(length / 2, 1e-3):
        raise MediaDecodeError(f"{name}: truncated (frames end at {reached:.3f} s of {duration_s:.3f} s)")


def probe_video(path: VideoPath, *, decode_check: bool = True) -> VideoProbe:
    """Size, duration, frame rate, codecs and tags of a video; with `decode_check`, prove it decodes to the end."""
    name = str(path)
    with _open_video(path) as (container, video):
        duration_s = _duration_s(container, video, name)
        fps = float(video.average_rate) if video.average_rate else None
        audio = container.streams.audio[0] if container.streams.audio else None
        probe = VideoProbe(
            width=video.width,
            height=video.height,
            duration_s=duration_s,
            fps=fps,
            codec=video.codec_context.name,
            has_audio=audio is not None,
            audio_codec=audio.codec_context.name if audio is not None else None,
            frame_count=video.frames or None,
            tags={str(key): str(value) for key, value in container.metadata.items()},
        )
        if decode_check:
            keyframes: dict[float, np.ndarray] = {}
            _check_decodes_to_end(container, video, duration_s, fps, name, keyframes)
    if decode_check:
        _remember_keyframes(path, keyframes)  # only once the whole file proved sound
    return probe


def short_side_px(resolution: str) -> int:
    """'720p' -> 720: the contract defines a resolution by the short side of the frame."""
    match = re.fullmatch(r"(\d+)p", resolution.strip().lower())
    if not match:
        raise ValueError(f"resolution {resolution!r} is not of the form '<short side>p', e.g. '720p'")
    return int(match.group(1))


def matches_request(
    probe: VideoProbe, *, resolution: str, duration_s: int, expect_audio: bool, tolerance_s: float = 0.1
) -> list[str]:
    """Human-readable differences between a probed video and what was requested; [] when it matches."""
    problems = []
    expected_side, actual_side = short_side_px(resolution), min(probe.width, probe.height)
    if actual_side != expected_side:
        problems.append(
            f"resolution: expected {resolution} (short side {expected_side} px), "
            f"got {probe.width}x{probe.height} (short side {actual_side} px)"
        )
    if abs(probe.duration_s - duration_s) > tolerance_s:
        problems.append(
            f"duration: expected {duration_s} s ± {tolerance_s:g} s, got {probe.duration_s:.3f} s"
        )
    if expect_audio and not probe.has_audio:
        problems.append("audio: expected an audio track, the video has none")
    if not expect_audio and probe.has_audio:
        problems.append(f"audio: expected no audio track, the video has one ({probe.audio_codec})")
    return problems


def extract_frame(path: VideoPath, at_s: float | None = None, *, fit: tuple[int, int] | None = None) -> Image.Image:
    """The frame shown at `at_s` seconds (default: the middle of the video), as an RGB image; with
    `fit` (width, height), shrunk to fit that box (never enlarged) by swscale as it converts the
    frame to RGB: a fifth of the time of converting a 720p frame whole and shrinking it in Pillow."""
    name = str(path)
    with _open_video(path) as (container, video):
        duration_s = _duration_s(container, video, name)
        target = duration_s / 2 if at_s is None else at_s
        if not 0 <= target <= duration_s:
            raise ValueError(f"{name}: at_s={target} is outside the video (0-{duration_s:.3f} s)")
        _seek_s(container, video, target)
        shown: VideoFrame | None = None
        # Decoding restarts at the previous keyframe: walk forward to the frame on screen at `target`.
        for frame in container.decode(video):
            if shown is not None and _start_s(frame, video) > target:
                break
            shown = frame
        if shown is None:
            raise MediaDecodeError(f"{name}: no frame decodes at {target:.3f} s")
        if fit is None:
            return shown.to_image()
        scale = min(fit[0] / shown.width, fit[1] / shown.height, 1.0)
        width, height = max(1, round(shown.width * scale)), max(1, round(shown.height * scale))
        return shown.reformat(width=width, height=height, format="rgb24", interpolation=SHRINK_INTERPOLATION).to_image()


def png_bytes(image: Image.Image) -> bytes:
    """`image` as PNG at zlib's level 6. Measured on sheets of emulator videos: a 960 x 7650 contact
    sheet takes 1.35 s and 1362 kB with optimize=True (level 9), 0.30 s and 1396 kB at level 6,
    0.18 s and 1660 kB at level 3; a 2120 x 1252 comparison page 275 ms / 250 kB, 78 ms / 261 kB
    and 53 ms / 328 kB. Level 6 is 4x faster than optimize for 3 % more bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _fit_label(draw: ImageDraw.ImageDraw, text: str, font: Any, max_width: int) -> str:
    """`text`, cut with an ellipsis so it fits in `max_width` px."""
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength(text + "…", font=font) > max_width:
        text = text[:-1]
    return text + "…"


def contact_sheet(
    items: Sequence[tuple[Image.Image | None, str]], *, columns: int = 4, tile_width: int = CONTACT_TILE_WIDTH
) -> bytes:
    """PNG grid with one labelled tile per (frame, label); a frame None (a video that cannot be
    decoded) gets a placeholder tile. The frames are small already (wan_pipeline.previews): a sheet
    of hundreds of videos must neither decode them all again nor hold them all at full size.

    Every tile is `tile_width` px wide. Its frame area is as tall as the tallest frame scaled to the
    tile (portrait at most 9:16); shorter frames are centred in it. The label sits in a strip below.
    """
    if not items:
        raise ValueError("a contact sheet needs at least one video")
    if columns < 1 or tile_width <= 2 * TILE_MARGIN:
        raise ValueError(f"columns must be >= 1 and tile_width > {2 * TILE_MARGIN} px")
    inner_width = tile_width - 2 * TILE_MARGIN
    frames = [frame for frame, _ in items]
    heights = [
        min(round(inner_width * f.height / f.width), round(inner_width * MAX_TILE_ASPECT))
        for f in frames
        if f
    ]
    frame_height = max(heights, default=round(inner_width * 9 / 16))
    tile_height = TILE_MARGIN + frame_height + LABEL_HEIGHT
    used_columns = min(columns, len(items))
    rows = math.ceil(len(items) / used_columns)
    sheet = Image.new("RGB", (used_columns * tile_width, rows * tile_height), SHEET_BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for index, ((_, label), frame) in enumerate(zip(items, frames, strict=True)):
        left = (index % used_columns) * tile_width + TILE_MARGIN
        top = (index // used_columns) * tile_height + TILE_MARGIN
        if frame is None:
            draw.rectangle((left, top, left + inner_width - 1, top + frame_height - 1), fill=PLACEHOLDER_FILL)
            draw.text(
                (left + inner_width / 2, top + frame_height / 2),
                "cannot decode",
                fill=LABEL_COLOUR,
                font=font,
                anchor="mm",
            )
        else:
            fitted = ImageOps.contain(frame, (inner_width, frame_height), SHEET_RESAMPLE)
            sheet.paste(
                fitted, (left + (inner_width - fitted.width) // 2, top + (frame_height - fitted.height) // 2)
            )
        draw.text(
            (left, top + frame_height + LABEL_HEIGHT / 2),
            _fit_label(draw, label, font, inner_width),
            fill=LABEL_COLOUR,
            font=font,
            anchor="lm",
        )
    return png_bytes(sheet)
