"""Quality metrics on videos made to fail them (and one made to pass all), encoded here with PyAV."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image, ImageDraw

from wan_pipeline.quality import QualityThresholds, assess_video, closeness, sample_video

SIZE = (320, 180)
FPS = 10
SECONDS = 3


def scene(seed: int, size: tuple[int, int] = (400, 225)) -> Image.Image:
    """A textured picture: shapes at places decided by `seed`."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, tuple(int(c) for c in rng.integers(40, 200, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.integers(0, size[0]), rng.integers(0, size[1])
        r = int(rng.integers(10, 60))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return image


def panning(image: Image.Image) -> Callable[[int, int], Image.Image]:
    """Frames that pan across `image` (starting exactly on it, cover-fitted to the frame)."""
    from PIL import ImageOps

    base = ImageOps.fit(image, (int(SIZE[0] * 1.3), int(SIZE[1] * 1.3)))

    def frame(index: int, count: int) -> Image.Image:
        if index == 0:
            return ImageOps.fit(image, SIZE)
        shift = int((base.width - SIZE[0]) * index / max(count - 1, 1))
        return base.crop((shift, shift // 2, shift + SIZE[0], shift // 2 + SIZE[1]))

    return frame


def make_video(
    path: Path,
    frame: Callable[[int, int], Image.Image],
    *,
    audio: str = "none",  # none | tone | silence
    seconds: int = SECONDS,
    gop: int = FPS,
) -> Path:
    count = FPS * seconds
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("libx264", rate=FPS, options={"preset": "ultrafast", "g": str(gop)})
        video.width, video.height, video.pix_fmt = SIZE[0], SIZE[1], "yuv420p"
        rate = 48_000
        stream = container.add_stream("aac", rate=rate, layout="mono") if audio != "none" else None
        for index in range(count):
            picture = av.VideoFrame.from_image(frame(index, count).convert("RGB"))
            picture.pts = index
            container.mux(video.encode(picture))
        container.mux(video.encode(None))
        if stream is not None:
            t = np.arange(rate * seconds) / rate
            samples = (0.3 * np.sin(2 * np.pi * 440 * t) if audio == "tone" else np.zeros_like(t)).astype(np.float32)
            for start in range(0, len(samples), 1024):
                chunk = av.AudioFrame.from_ndarray(samples[None, start : start + 1024], format="fltp", layout="mono")
                chunk.sample_rate, chunk.pts = rate, start
                container.mux(stream.encode(chunk))
            container.mux(stream.encode(None))
    return path


@pytest.fixture
def source() -> Image.Image:
    return scene(1)


@pytest.fixture
def good(tmp_path: Path, source: Image.Image) -> Path:
    return make_video(tmp_path / "good.mp4", panning(source), audio="tone")


def test_a_sound_video_passes_every_check(good: Path, source: Image.Image) -> None:
    report = assess_video(good, source_image=source, expect_audio=True)
    assert report.passed, report.failures
    assert report.first_frame_ssim > 0.8
    assert report.motion > 1.0
    assert report.longest_blank_s == 0.0
    assert report.audio_rms_dbfs > -20
    assert report.samples >= 3  # keyframes only: one a second
    assert report.to_dict()["passed"] is True


def test_a_frozen_video_fails_motion(tmp_path: Path, source: Image.Image) -> None:
    frozen = make_video(tmp_path / "frozen.mp4", lambda i, n: source.resize(SIZE))
    report = assess_video(frozen, source_image=source, expect_audio=False)
    assert report.motion is not None and report.motion < 0.2
    assert [f.split(":")[0] for f in report.failures] == ["motion"]


def test_a_black_stretch_fails_blank_and_a_black_video_fails_too(tmp_path: Path, source: Image.Image) -> None:
    moving = panning(source)
    black = Image.new("RGB", SIZE, (4, 4, 4))
    middle_black = make_video(
        tmp_path / "gap.mp4", lambda i, n: black if n // 4 <= i < n - 2 else moving(i, n), seconds=5
    )
    report = assess_video(middle_black, source_image=source, expect_audio=False)
    assert report.longest_blank_s >= 2.0
    assert any(f.startswith("blank:") for f in report.failures)

    all_black = make_video(tmp_path / "black.mp4", lambda i, n: black)
    report = assess_video(all_black, source_image=source, expect_audio=False)
    assert report.blank_fraction == 1.0 and report.longest_blank_s == pytest.approx(SECONDS, abs=0.2)
    assert {f.split(":")[0] for f in report.failures} == {"first frame", "motion", "blank"}


def test_a_flat_grey_video_is_blank_though_not_black(tmp_path: Path) -> None:
    grey = make_video(tmp_path / "grey.mp4", lambda i, n: Image.new("RGB", SIZE, (128, 128, 128)))
    report = assess_video(grey, source_image=None, expect_audio=False)
    assert report.first_frame_ssim is None  # nothing to compare with: not a failure
    assert any(f.startswith("blank:") for f in report.failures)


def test_a_silent_track_fails_audio_when_audio_was_asked_for(tmp_path: Path, source: Image.Image) -> None:
    silent = make_video(tmp_path / "silent.mp4", panning(source), audio="silence")
    report = assess_video(silent, source_image=source, expect_audio=True)
    assert report.has_audio and report.audio_rms_dbfs < -90
    assert [f.split(":")[0] for f in report.failures] == ["audio"] and "silent" in report.failures[0]


def test_audio_must_be_absent_when_not_asked_for_and_present_when_asked(good: Path, tmp_path: Path, source) -> None:
    assert assess_video(good, source_image=source, expect_audio=False).failures == [
        "audio: no audio was requested, the video has an audio track"
    ]
    mute = make_video(tmp_path / "mute.mp4", panning(source))
    assert assess_video(mute, source_image=source, expect_audio=True).failures == [
        "audio: audio was requested, the video has no audio track"
    ]


def test_a_first_frame_off_the_source_image_fails_fidelity(good: Path, source: Image.Image) -> None:
    other = scene(2)
    report = assess_video(good, source_image=other, expect_audio=True)
    assert report.first_frame_ssim < 0.3
    assert [f.split(":")[0] for f in report.failures] == ["first frame"]
    # The image may be given as a path or bytes too, and of another aspect (it is cover-fitted).
    matched = assess_video(good, source_image=source.resize((600, 600)), expect_audio=True)
    assert matched.first_frame_ssim > 0.45


def test_thresholds_are_configurable_through_the_environment(tmp_path: Path, good: Path, source) -> None:
    thresholds = QualityThresholds.from_env({"WAN_PIPELINE_QUALITY_MIN_MOTION": "1000"})
    assert thresholds.min_motion == 1000 and thresholds.max_blank_s == QualityThresholds().max_blank_s
    report = assess_video(good, source_image=source, expect_audio=True, thresholds=thresholds)
    assert [f.split(":")[0] for f in report.failures] == ["motion"]
    with pytest.raises(ValueError, match="WAN_PIPELINE_QUALITY_MAX_BLANK_S='x' is not a number"):
        QualityThresholds.from_env({"WAN_PIPELINE_QUALITY_MAX_BLANK_S": "x"})


def test_a_file_with_one_keyframe_is_sampled_from_every_frame(tmp_path: Path, source: Image.Image) -> None:
    one_gop = make_video(tmp_path / "onegop.mp4", panning(source), gop=1000)
    sampled = sample_video(one_gop)
    assert not sampled.keyframes_only and len(sampled.frames) >= 5
    assert assess_video(one_gop, source_image=source, expect_audio=False).passed


def test_closeness_of_a_reproduction(tmp_path: Path, good: Path, source: Image.Image) -> None:
    same = closeness(good, good, same_sha256=True)
    assert same.identical_bytes and same.mean_ssim == pytest.approx(1.0) and "identical" in same.describe()
    different = closeness(good, make_video(tmp_path / "other.mp4", panning(scene(3))))
    assert not different.identical_bytes and different.mean_ssim < 0.5 and different.aligned_frames >= 3
