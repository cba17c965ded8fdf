"""Quality metrics on videos made to fail them (and one made to pass all), encoded here with PyAV."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image, ImageDraw

from wan_pipeline.media import probe_video, take_probed_keyframes
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
    audio: str = "none",  # none | tone | silence | late (silent first half, tone second half)
    seconds: int = SECONDS,
    gop: int = FPS,
    preset: str = "ultrafast",  # "veryfast" and slower reorder frames (B-frames)
) -> Path:
    count = FPS * seconds
    with av.open(str(path), mode="w") as container:
        options = {"preset": preset, "g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"}
        video = container.add_stream("libx264", rate=FPS, options=options)
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
            tone = 0.3 * np.sin(2 * np.pi * 440 * t)
            if audio == "late":
                tone[: len(t) // 2] = 0
            samples = (tone if audio in ("tone", "late") else np.zeros_like(t)).astype(np.float32)
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


def _steps(frames: list[np.ndarray]) -> list[float]:
    return [float(np.abs(a - b).mean()) for a, b in zip(frames, frames[1:], strict=False)]


def test_keyframes_are_sampled_by_seeking_each_one_even_when_frames_are_reordered(tmp_path: Path, source) -> None:
    # x264 "veryfast" writes B-frames: a keyframe is shown after its decoding time, and a seek that
    # trusted the index's (decoding) time would land on the keyframe before, twice over.
    for preset in ("ultrafast", "veryfast"):
        video = make_video(tmp_path / f"{preset}.mp4", panning(source), seconds=4, preset=preset)
        sampled = sample_video(video)
        assert sampled.keyframes_only and sampled.times == pytest.approx([0.0, 1.0, 2.0, 3.0])
        assert min(_steps(sampled.frames)) > 1.0, preset  # four different frames, none decoded twice
        assert assess_video(video, source_image=source, expect_audio=False).passed


def test_sampled_motion_flags_a_frozen_video_and_a_video_frozen_halfway(tmp_path: Path, source) -> None:
    still = source.resize(SIZE)
    for preset in ("ultrafast", "veryfast"):
        frozen = make_video(tmp_path / f"frozen-{preset}.mp4", lambda i, n: still, seconds=4, preset=preset)
        report = assess_video(frozen, source_image=source, expect_audio=False)
        assert report.motion < 0.2 and [f.split(":")[0] for f in report.failures] == ["motion"]
    moving = panning(source)
    full = make_video(tmp_path / "moving.mp4", moving, seconds=6)
    half = make_video(tmp_path / "half.mp4", lambda i, n: moving(min(i, n // 2), n), seconds=6)
    steps = _steps(sample_video(half).frames)
    # Frames sampled in the second half really come from it: they no longer change.
    assert len(steps) == 5 and min(steps[:3]) > 1.0 and max(steps[3:]) < 0.2
    # The mean over the video is half the motion of the same pan kept going: it alone would pass...
    report = assess_video(half, source_image=source, expect_audio=False)
    assert 0.4 < report.motion / sample_video_motion(full) < 0.75
    assert report.motion > QualityThresholds().min_motion
    # ...so the frozen second half fails on its own (sampled from 3 s to the last sample, at 5 s).
    assert report.longest_frozen_s == 2.0
    assert report.failures == ["motion: frozen for 2.0 s (sampled frames changing less than 0.5), above 1.5 s"]
    assert assess_video(full, source_image=source, expect_audio=False).longest_frozen_s == 0.0


def sample_video_motion(path: Path) -> float:
    return float(np.mean(_steps(sample_video(path).frames)))


def test_grey_levels_are_full_range_from_the_luma_plane(tmp_path: Path) -> None:
    black = make_video(tmp_path / "black.mp4", lambda i, n: Image.new("RGB", SIZE, (4, 4, 4)))
    white = make_video(tmp_path / "white.mp4", lambda i, n: Image.new("RGB", SIZE, (250, 250, 250)))
    assert float(sample_video(black).frames[0].mean()) < 8  # limited-range luma would read 16 or more
    assert float(sample_video(white).frames[0].mean()) > 245


def test_audio_loudness_is_measured_over_stretches_spread_over_the_track(tmp_path: Path, source) -> None:
    # 5 s of AAC at 48 kHz is 235 frames: only stretches of it are decoded, from start to end.
    tone = sample_video(make_video(tmp_path / "tone.mp4", panning(source), audio="tone", seconds=5))
    assert tone.audio_rms_dbfs == pytest.approx(20 * np.log10(0.3 / np.sqrt(2)), abs=1.0)
    late = make_video(tmp_path / "late.mp4", panning(source), audio="late", seconds=5)
    report = assess_video(late, source_image=source, expect_audio=True)
    assert report.passed and -20 < report.audio_rms_dbfs < -10  # sound only in the second half counts


def test_the_probe_hands_its_keyframes_to_the_checks_once(tmp_path: Path, good: Path, source) -> None:
    alone = sample_video(good)
    probe_video(good)
    after_probe = sample_video(good)  # the first frame and the last second's keyframe: from the probe
    assert after_probe.times == alone.times
    for a, b in zip(alone.frames, after_probe.frames, strict=True):
        assert float(np.abs(a - b).mean()) < 0.5
    assert take_probed_keyframes(good) == {}  # handed over once
    probe_video(good)
    # A file rewritten since its probe is decoded afresh.
    other = make_video(tmp_path / "other.mp4", panning(scene(5)))
    good.write_bytes(other.read_bytes())
    replaced = sample_video(good)
    assert float(np.abs(replaced.frames[0] - alone.frames[0]).mean()) > 5


def test_the_source_image_gives_one_result_as_picture_bytes_or_path(tmp_path: Path, good: Path, source) -> None:
    path = tmp_path / "source.jpg"
    source.save(path, quality=95)
    as_picture = assess_video(good, source_image=Image.open(path), expect_audio=True).first_frame_ssim
    for given in (path, path.read_bytes(), path.read_bytes()):  # the last one from the cache
        assert assess_video(good, source_image=given, expect_audio=True).first_frame_ssim == pytest.approx(as_picture, abs=0.03)
