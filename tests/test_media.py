"""Probing, request matching and previews of downloaded videos, on small mp4s written here with PyAV."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from upath import UPath

from wan_pipeline.media import (
    LABEL_HEIGHT,
    PLACEHOLDER_FILL,
    TILE_MARGIN,
    MediaDecodeError,
    VideoProbe,
    contact_sheet,
    extract_frame,
    matches_request,
    probe_video,
    short_side_px,
)

FPS = 4
SECONDS = 5
FRAMES = FPS * SECONDS
AUDIO_RATE = 16_000


def grey_level(index: int) -> int:
    """Each frame is one flat grey, distinct per frame, so a decoded frame tells which one it is."""
    return 20 + index * 10


def write_video(
    path: Path,
    *,
    width: int = 64,
    height: int = 36,
    seconds: int = SECONDS,
    audio: bool = False,
    faststart: bool = False,
    comment: str | None = None,
) -> Path:
    """An h264 mp4 at FPS frames per second, optionally with a silent AAC track.

    `faststart` puts the index before the media data, as web-served videos usually have it: a
    truncated copy of such a file still opens, which is what the decode check must catch.
    """
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), mode="w", format="mp4", options=options) as container:
        if comment:
            container.metadata["comment"] = comment
        # Every stream must exist before the first packet is muxed.
        video = container.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"preset": "ultrafast"}
        track = container.add_stream("aac", rate=AUDIO_RATE) if audio else None
        for index in range(seconds * FPS):
            pixels = np.full((height, width, 3), grey_level(index), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, FPS)
            container.mux(video.encode(frame))
        container.mux(video.encode())
        if track is not None:
            for start in range(0, seconds * AUDIO_RATE, 1024):
                silence = av.AudioFrame.from_ndarray(
                    np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
                )
                silence.sample_rate, silence.pts = AUDIO_RATE, start
                container.mux(track.encode(silence))
            container.mux(track.encode())
    return path


def truncated_copy(source: Path, destination: Path, keep: float) -> Path:
    data = source.read_bytes()
    destination.write_bytes(data[: int(len(data) * keep)])
    return destination


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    return {
        "720p_audio": write_video(
            root / "720p_audio.mp4", width=1280, height=720, audio=True, comment="seed 7"
        ),
        "720p_silent": write_video(root / "720p_silent.mp4", width=1280, height=720),
        "small": write_video(root / "small.mp4"),
        "small_faststart": write_video(root / "small_faststart.mp4", faststart=True),
        "portrait": write_video(root / "portrait.mp4", width=36, height=64, seconds=1),
    }


@pytest.fixture
def memory_root() -> Iterator[UPath]:
    root = UPath(f"memory://media-tests/{uuid.uuid4().hex}")
    yield root
    root.fs.rm(root.path, recursive=True)


def probe(**overrides: object) -> VideoProbe:
    fields: dict = dict(
        width=1280,
        height=720,
        duration_s=5.0,
        fps=24.0,
        codec="h264",
        has_audio=True,
        audio_codec="aac",
        frame_count=120,
        tags={},
    )
    return VideoProbe(**{**fields, **overrides})


def test_probe_reports_size_duration_codecs_and_tags(videos: dict[str, Path]) -> None:
    result = probe_video(videos["720p_audio"])
    assert (result.width, result.height) == (1280, 720)
    assert result.duration_s == pytest.approx(SECONDS, abs=0.01)
    assert result.fps == pytest.approx(FPS)
    assert result.frame_count == FRAMES
    assert result.codec == "h264"
    assert result.has_audio and result.audio_codec == "aac"
    assert result.tags["comment"] == "seed 7"
    # The sidecar stores the probe as JSON.
    assert json.loads(json.dumps(result.to_dict()))["tags"]["comment"] == "seed 7"


def test_probe_without_audio_track(videos: dict[str, Path]) -> None:
    result = probe_video(videos["720p_silent"])
    assert not result.has_audio
    assert result.audio_codec is None


def test_probe_reads_through_fsspec(videos: dict[str, Path], memory_root: UPath) -> None:
    remote = memory_root / "set" / "video.mp4"
    remote.write_bytes(videos["720p_audio"].read_bytes())
    assert probe_video(remote) == probe_video(videos["720p_audio"])
    assert probe_video(str(remote)).width == 1280


@pytest.mark.parametrize("source", ["small", "small_faststart"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_video_fails_the_probe(
    videos: dict[str, Path], tmp_path: Path, source: str, keep: float
) -> None:
    cut = truncated_copy(videos[source], tmp_path / "cut.mp4", keep)
    with pytest.raises(MediaDecodeError, match="cut.mp4"):
        probe_video(cut)


def test_decode_check_is_what_catches_a_truncated_faststart_file(
    videos: dict[str, Path], tmp_path: Path
) -> None:
    # The index at the front still describes the whole video: only decoding the tail shows it is missing.
    cut = truncated_copy(videos["small_faststart"], tmp_path / "cut.mp4", 0.9)
    assert probe_video(cut, decode_check=False).duration_s == pytest.approx(SECONDS, abs=0.01)
    with pytest.raises(MediaDecodeError, match="truncated"):
        probe_video(cut)


def test_copy_cut_between_two_frames_fails_the_probe(videos: dict[str, Path], tmp_path: Path) -> None:
    # No partial packet to flag: the frames simply stop before the duration the index declares.
    source = videos["small_faststart"]
    with av.open(str(source)) as container:
        ends = sorted(packet.pos + packet.size for packet in container.demux(video=0) if packet.size)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(source.read_bytes()[: ends[-3]])
    with pytest.raises(MediaDecodeError, match="frames end at"):
        probe_video(cut)


def test_truncated_video_fails_through_fsspec(videos: dict[str, Path], memory_root: UPath) -> None:
    remote = memory_root / "cut.mp4"
    data = videos["small_faststart"].read_bytes()
    remote.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaDecodeError, match="cut.mp4"):
        probe_video(remote)


def test_file_that_is_not_a_video_fails_the_probe(tmp_path: Path) -> None:
    not_video = tmp_path / "error-page.mp4"
    not_video.write_bytes(b"<html><body>403 Forbidden</body></html>")
    with pytest.raises(MediaDecodeError, match="error-page.mp4"):
        probe_video(not_video)


def test_image_is_not_a_video(tmp_path: Path) -> None:
    picture = tmp_path / "still.png"
    Image.new("RGB", (8, 8)).save(picture)
    with pytest.raises(MediaDecodeError, match="still.png"):
        probe_video(picture)


def test_probed_video_matches_its_request(videos: dict[str, Path]) -> None:
    result = probe_video(videos["720p_audio"])
    assert matches_request(result, resolution="720p", duration_s=5, expect_audio=True) == []


def test_wrong_resolution_is_reported(videos: dict[str, Path]) -> None:
    result = probe_video(videos["720p_silent"])
    problems = matches_request(result, resolution="1080p", duration_s=5, expect_audio=False)
    assert len(problems) == 1
    assert "1080p" in problems[0] and "1280x720" in problems[0]


def test_resolution_is_the_short_side() -> None:
    assert (
        matches_request(probe(width=720, height=1280), resolution="720p", duration_s=5, expect_audio=True)
        == []
    )
    assert (
        matches_request(probe(width=1920, height=1080), resolution="1080p", duration_s=5, expect_audio=True)
        == []
    )
    assert matches_request(probe(width=1280, height=704), resolution="720p", duration_s=5, expect_audio=True)


def test_wrong_duration_is_reported() -> None:
    problems = matches_request(probe(duration_s=5.0), resolution="720p", duration_s=10, expect_audio=True)
    assert len(problems) == 1 and problems[0].startswith("duration")
    assert "10 s" in problems[0] and "5.000 s" in problems[0]


def test_duration_within_tolerance_matches() -> None:
    assert matches_request(probe(duration_s=5.06), resolution="720p", duration_s=5, expect_audio=True) == []
    assert matches_request(probe(duration_s=5.2), resolution="720p", duration_s=5, expect_audio=True)
    assert (
        matches_request(
            probe(duration_s=5.2), resolution="720p", duration_s=5, expect_audio=True, tolerance_s=0.25
        )
        == []
    )


def test_missing_and_unexpected_audio_are_reported() -> None:
    missing = matches_request(
        probe(has_audio=False, audio_codec=None), resolution="720p", duration_s=5, expect_audio=True
    )
    unexpected = matches_request(probe(), resolution="720p", duration_s=5, expect_audio=False)
    assert len(missing) == 1 and "audio" in missing[0]
    assert len(unexpected) == 1 and "aac" in unexpected[0]


def test_every_mismatch_is_listed() -> None:
    result = probe(width=640, height=360, duration_s=15.0, has_audio=False, audio_codec=None)
    assert len(matches_request(result, resolution="1080p", duration_s=5, expect_audio=True)) == 3


def test_malformed_resolution_is_refused() -> None:
    assert short_side_px("1080p") == 1080
    with pytest.raises(ValueError, match="resolution"):
        matches_request(probe(), resolution="HD", duration_s=5, expect_audio=True)


@pytest.mark.parametrize(
    ("at_s", "index"), [(None, FRAMES // 2), (0.0, 0), (1.3, 5), (SECONDS - 0.01, FRAMES - 1)]
)
def test_extract_frame_returns_the_frame_shown_at_that_time(
    videos: dict[str, Path], at_s: float | None, index: int
) -> None:
    frame = extract_frame(videos["small"], at_s)
    assert frame.size == (64, 36)
    assert frame.getpixel((32, 18))[0] == pytest.approx(grey_level(index), abs=4)


def test_extract_frame_outside_the_video_is_refused(videos: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="outside"):
        extract_frame(videos["small"], SECONDS + 1)


def test_a_frame_extracted_to_fit_a_box_keeps_its_aspect_and_is_never_enlarged(videos: dict[str, Path]) -> None:
    whole = extract_frame(videos["720p_audio"])
    small = extract_frame(videos["720p_audio"], fit=(160, 160))
    assert whole.size == (1280, 720) and small.size == (160, 90)
    # The same picture: the whole frame shrunk the same way differs only by rounding.
    reference = np.asarray(whole.resize(small.size, Image.Resampling.BOX), dtype=np.float32)
    assert np.abs(np.asarray(small, dtype=np.float32) - reference).mean() < 3
    assert extract_frame(videos["720p_audio"], fit=(4000, 4000)).size == (1280, 720)


def sheet_tile_height(tile_width: int, frame_width: int, frame_height: int) -> int:
    return TILE_MARGIN + round((tile_width - 2 * TILE_MARGIN) * frame_height / frame_width) + LABEL_HEIGHT


@pytest.fixture(scope="module")
def frames(videos: dict[str, Path]) -> dict[str, Image.Image]:
    """Each test video's middle frame: what a contact sheet is drawn from (wan_pipeline.previews)."""
    return {name: extract_frame(path) for name, path in videos.items()}


@pytest.mark.parametrize(("count", "columns", "grid"), [(1, 4, (1, 1)), (4, 4, (4, 1)), (5, 2, (2, 3))])
def test_contact_sheet_has_one_tile_per_video(
    frames: dict[str, Image.Image], count: int, columns: int, grid: tuple[int, int]
) -> None:
    items = [(frames["small"], f"a1b2c3d4 seed {n} 720p 5s") for n in range(count)]
    sheet = Image.open(io.BytesIO(contact_sheet(items, columns=columns, tile_width=136)))
    assert sheet.format == "PNG"
    assert sheet.size == (grid[0] * 136, grid[1] * sheet_tile_height(136, 64, 36))


def test_contact_sheet_draws_a_placeholder_for_videos_that_cannot_be_decoded(frames: dict[str, Image.Image]) -> None:
    items = [(frames["small"], "good"), (None, "broken"), (None, "missing")]
    sheet = Image.open(io.BytesIO(contact_sheet(items, columns=3, tile_width=136))).convert("RGB")
    assert sheet.size == (3 * 136, sheet_tile_height(136, 64, 36))
    corner = (TILE_MARGIN + 2, TILE_MARGIN + 2)  # inside the frame area, away from any text
    assert sheet.getpixel(corner)[0] == pytest.approx(grey_level(FRAMES // 2), abs=6)
    for column in (1, 2):
        assert sheet.getpixel((column * 136 + corner[0], corner[1])) == PLACEHOLDER_FILL


def test_contact_sheet_draws_the_labels(frames: dict[str, Image.Image]) -> None:
    def label_strip(label: str) -> Image.Image:
        sheet = Image.open(io.BytesIO(contact_sheet([(frames["small"], label)], tile_width=136))).convert("L")
        return sheet.crop((0, sheet.height - LABEL_HEIGHT, sheet.width, sheet.height))

    assert label_strip("").getextrema()[0] == label_strip("").getextrema()[1]  # blank strip: one colour
    assert label_strip("a1b2c3d4 seed 7 720p 5s").getextrema()[1] > 150  # light text on the dark strip


def test_contact_sheet_fits_portrait_and_landscape_videos(frames: dict[str, Image.Image]) -> None:
    items = [(frames["small"], "landscape"), (frames["portrait"], "portrait")]
    sheet = Image.open(io.BytesIO(contact_sheet(items, tile_width=136)))
    # The frame area is as tall as the tallest (portrait) frame, capped at 9:16.
    assert sheet.size == (2 * 136, sheet_tile_height(136, 36, 64))


def test_contact_sheet_needs_videos() -> None:
    with pytest.raises(ValueError, match="at least one"):
        contact_sheet([])
