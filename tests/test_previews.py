"""Previews: each video's middle frame made once, stored by its sha256, and what the sheets draw from."""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_media import FRAMES, grey_level, truncated_copy, write_video
from upath import UPath

from wan_pipeline import previews
from wan_pipeline.emulator.video import VideoRecipe, encode_mp4
from wan_pipeline.experiments import (
    HEADER_HEIGHT,
    MARGIN,
    MISSING,
    SheetCell,
    SheetPage,
    comparison_layout,
    render_comparison_page,
)
from wan_pipeline.media import PLACEHOLDER_FILL, TILE_MARGIN, contact_sheet, extract_frame
from wan_pipeline.previews import PREVIEW_BOX, make_preview, preview_image, preview_images, store_preview
from wan_pipeline.storage import VideoStore, file_sha256

REPO = Path(__file__).resolve().parents[1]
MIDDLE_GREY = grey_level(FRAMES // 2)


def sha_of(path: Path | UPath) -> str:
    return file_sha256(path)[1]


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), np.float32)


@pytest.fixture(scope="module")
def panning_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An emulator video (720p, 2 fps): a slow pan across a sample image, so every frame differs."""
    image = (REPO / "data" / "images" / "still_life.png").read_bytes()
    recipe = VideoRecipe(hashlib.sha256(image).hexdigest(), 1280, 720, 2, 5, "none", image=image)
    path = tmp_path_factory.mktemp("previews") / "pan.mp4"
    path.write_bytes(encode_mp4(recipe))
    return path


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VideoStore]:
    """A store on local disk, and one on fsspec's memory filesystem (as a URL root is)."""
    if request.param == "local":
        yield VideoStore(str(tmp_path / "out"))
        return
    root = UPath(f"memory://preview-tests/{uuid.uuid4().hex}")
    yield VideoStore(root)
    root.fs.rm(root.path, recursive=True)


@pytest.fixture
def video(store: VideoStore, tmp_path: Path) -> UPath:
    """A small video of flat grey frames (each a different grey) stored in `store`."""
    path = store.set_dir("demo") / "video.mp4"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(write_video(tmp_path / "source.mp4").read_bytes())
    return path


def test_the_preview_is_the_middle_frame_shrunk_as_a_jpeg(panning_video: Path) -> None:
    preview = Image.open(io.BytesIO(make_preview(panning_video)))
    assert preview.format == "JPEG" and preview.size == (PREVIEW_BOX[0], 176)

    def shrunk(at_s: float | None) -> np.ndarray:
        frame = extract_frame(panning_video, at_s)
        frame.thumbnail(PREVIEW_BOX, Image.Resampling.LANCZOS)
        return as_array(frame)

    # Mean difference per channel (0-255): the filter and JPEG cost about 1; the pan moves far more.
    assert np.abs(as_array(preview) - shrunk(None)).mean() < 2
    assert np.abs(as_array(preview) - shrunk(0.0)).mean() > 10


@pytest.mark.parametrize(("size", "expected"), [((36, 64), (36, 64)), ((320, 1280), (139, 555))])
def test_a_preview_fits_the_largest_tile_and_is_never_enlarged(
    tmp_path: Path, size: tuple[int, int], expected: tuple[int, int]
) -> None:
    path = write_video(tmp_path / "v.mp4", width=size[0], height=size[1], seconds=1)
    assert Image.open(io.BytesIO(make_preview(path))).size == expected


def test_the_preview_is_stored_by_the_videos_sha256_in_the_stores_previews_folder(
    store: VideoStore, video: UPath
) -> None:
    sha = sha_of(video)
    path = store_preview(store, sha, video)
    assert path == store.root / ".previews" / f"{sha}.jpg" == store.preview_path(sha)
    assert path.read_bytes() == make_preview(video)
    assert [p.name for p in path.parent.iterdir()] == [f"{sha}.jpg"]  # nothing temporary left beside it


@pytest.mark.parametrize("name", ["../../etc/passwd", "A" * 64, "g" * 64, "", "ab" * 32 + "/x"])
def test_a_preview_is_only_named_by_a_hex_sha256(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="video sha256"):
        VideoStore(str(tmp_path)).preview_path(name)


def test_a_missing_preview_is_made_and_written_on_first_use(store: VideoStore, video: UPath) -> None:
    sha = sha_of(video)
    assert not store.preview_path(sha).exists()
    image = preview_image(store, sha, video)
    assert image is not None and image.getpixel((10, 10))[0] == pytest.approx(MIDDLE_GREY, abs=4)
    assert store.preview_path(sha).read_bytes() == make_preview(video)


def test_a_stored_preview_is_used_without_opening_the_video(store: VideoStore, video: UPath) -> None:
    sha = sha_of(video)
    store_preview(store, sha, video)
    video.write_bytes(b"not a video any more")  # a decode would fail: only the preview can answer
    image = preview_image(store, sha, video)
    assert image is not None and image.getpixel((10, 10))[0] == pytest.approx(MIDDLE_GREY, abs=4)


def test_an_unreadable_preview_is_made_again_from_the_video(store: VideoStore, video: UPath) -> None:
    sha = sha_of(video)
    good = store_preview(store, sha, video).read_bytes()
    store.preview_path(sha).write_bytes(good[: len(good) // 2])  # cut short (a copy that died)
    image = preview_image(store, sha, video)
    assert image is not None and image.getpixel((10, 10))[0] == pytest.approx(MIDDLE_GREY, abs=4)
    assert store.preview_path(sha).read_bytes() == good


def test_an_undecodable_or_missing_video_without_a_preview_has_none(store: VideoStore, video: UPath) -> None:
    broken = store.set_dir("demo") / "broken.mp4"
    broken.write_bytes(video.read_bytes()[: video.stat().st_size // 2])
    gone = store.set_dir("demo") / "gone.mp4"
    assert preview_images(store, [("a" * 64, broken), ("b" * 64, gone), None]) == [None, None, None]
    assert not store.preview_path("a" * 64).exists() and not store.preview_path("b" * 64).exists()


def test_a_preview_that_cannot_be_written_still_shows(
    store: VideoStore, video: UPath, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(destination: object, data: bytes) -> None:
        raise PermissionError(f"read-only store: {destination}")

    monkeypatch.setattr(previews, "write_atomically", refuse)
    image = preview_image(store, sha_of(video), video)
    assert image is not None and image.getpixel((10, 10))[0] == pytest.approx(MIDDLE_GREY, abs=4)
    assert not store.preview_path(sha_of(video)).exists()


# ---------------------------------------------------------------------------------------------------
# The sheets draw from the previews


def test_the_contact_sheet_of_stored_previews_opens_no_video(store: VideoStore, video: UPath, tmp_path: Path) -> None:
    sha = sha_of(video)
    store_preview(store, sha, video)
    video.unlink()
    broken = truncated_copy(write_video(tmp_path / "b.mp4"), tmp_path / "broken.mp4", 0.5)
    frames = preview_images(store, [(sha, video), ("c" * 64, broken)])
    sheet = Image.open(io.BytesIO(contact_sheet(list(zip(frames, ["kept", "broken"], strict=True)), tile_width=136)))
    corner = (TILE_MARGIN + 2, TILE_MARGIN + 2)  # inside the frame area, away from any text
    assert sheet.convert("RGB").getpixel(corner)[0] == pytest.approx(MIDDLE_GREY, abs=6)
    assert sheet.convert("RGB").getpixel((136 + corner[0], corner[1])) == PLACEHOLDER_FILL


def test_a_comparison_page_of_stored_previews_opens_no_video(store: VideoStore, video: UPath) -> None:
    sha = sha_of(video)
    store_preview(store, sha, video)
    video.write_bytes(b"corrupt")
    cells = (
        SheetCell(0, 0, "a" * 32, "kept", str(video), sha, "completed"),
        SheetCell(0, 1, "b" * 32, "no preview, no video", str(video), "d" * 64, "completed"),
        SheetCell(0, 2, "c" * 32, "failed", None, None, "failed"),
    )
    page = SheetPage("img", None, "seed", (), (1, 2, 3), (), cells)
    sheet = Image.open(io.BytesIO(render_comparison_page(page, store))).convert("RGB")
    corner = [(column * 240 + MARGIN + 2, HEADER_HEIGHT + MARGIN + 2) for column in range(3)]
    assert sheet.getpixel(corner[0])[0] == pytest.approx(MIDDLE_GREY, abs=6)
    assert sheet.getpixel(corner[1]) == MISSING
    assert sheet.getpixel((corner[2][0] + 60, corner[2][1] + 60)) == MISSING  # inside the red outline


def test_a_comparison_cell_whose_recorded_hash_cannot_name_a_preview_gets_the_placeholder(
    store: VideoStore, video: UPath
) -> None:
    table = pd.DataFrame([
        {"request_key": "a" * 32, "image_ref": "img", "seed": 1, "state": "completed", "video_path": str(video),
         "video_sha256": sha_of(video)},
        {"request_key": "b" * 32, "image_ref": "img", "seed": 2, "state": "completed", "video_path": str(video),
         "video_sha256": "../../hand-edited"},
    ])
    (page,) = comparison_layout(table)
    assert [cell.video_sha256 for cell in page.cells] == [sha_of(video), None]
    sheet = Image.open(io.BytesIO(render_comparison_page(page, store))).convert("RGB")
    corner = [(column * 240 + MARGIN + 2, HEADER_HEIGHT + MARGIN + 2) for column in range(2)]
    assert sheet.getpixel(corner[0])[0] == pytest.approx(MIDDLE_GREY, abs=6)
    assert sheet.getpixel(corner[1]) == MISSING
