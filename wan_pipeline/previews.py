"""Previews: each stored video's middle frame, small, as a JPEG made once and reused by every sheet.

A sheet used to decode every video it shows, on every run (seconds per hundred videos, minutes per
thousands). A preview is made once, right after a video is stored and checked, at
`<root>/.previews/<sha256>.jpg` (`VideoStore.preview_path`): named by the video's content, it can
never be stale, and a set that copies a video from another shares its preview. Deleting previews
is harmless: a sheet remakes (and stores) the ones it misses.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from PIL import Image
from upath import UPath

from wan_pipeline.media import (
    CONTACT_TILE_WIDTH,
    MAX_TILE_ASPECT,
    TILE_MARGIN,
    MediaDecodeError,
    VideoPath,
    extract_frame,
)
from wan_pipeline.storage import VideoStore, write_atomically

logger = logging.getLogger(__name__)

# The largest frame area a sheet draws (the contact sheet's default tile; comparison cells are
# smaller): a preview fits in it, so a sheet only ever shrinks it.
PREVIEW_WIDTH = CONTACT_TILE_WIDTH - 2 * TILE_MARGIN
PREVIEW_BOX = (PREVIEW_WIDTH, round(PREVIEW_WIDTH * MAX_TILE_ASPECT))
# A 312 x 176 preview of an emulator video is 6 kB. Full chroma (4:4:4, 1.4 kB more than 4:2:0)
# because a sheet is a PNG, which JPEG's noise makes bigger: a 100-tile contact sheet is 824 kB
# drawn from the frames themselves, 1139 kB from 4:4:4 previews, 1337 kB from 4:2:0 ones.
JPEG_OPTIONS = {"format": "JPEG", "quality": 85, "subsampling": 0}
PREVIEW_WORKERS = 4  # previews read (or made, when missing) at once for one sheet page


def make_preview(video_path: VideoPath) -> bytes:
    """JPEG of the video's middle frame (`extract_frame`'s) shrunk to fit `PREVIEW_BOX`.

    Raises MediaDecodeError (or OSError: missing, unreadable) when the video does not decode."""
    frame = extract_frame(video_path, fit=PREVIEW_BOX)
    buffer = io.BytesIO()
    frame.save(buffer, **JPEG_OPTIONS)
    return buffer.getvalue()


def store_preview(store: VideoStore, sha256: str, video_path: VideoPath) -> UPath:
    """Make the preview of the video whose content hashes to `sha256` and write it (atomically)."""
    return write_atomically(store.preview_path(sha256), make_preview(video_path))


def _decoded(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")  # decodes now: a broken file fails here, not in the sheet


def _stored_preview(path: UPath) -> Image.Image | None:
    try:
        return _decoded(path.read_bytes())
    except OSError:  # missing, unreadable, or not a whole JPEG (PIL's errors are OSErrors)
        return None


def preview_image(store: VideoStore, sha256: str, video_path: VideoPath) -> Image.Image | None:
    """The video's preview: the stored one, else made from the video and stored for next time.
    None when there is none and the video does not decode (a sheet then draws its placeholder)."""
    path = store.preview_path(sha256)
    stored = _stored_preview(path)
    if stored is not None:
        return stored
    try:
        data = make_preview(video_path)
    except (MediaDecodeError, OSError):
        return None
    try:
        write_atomically(path, data)
    except Exception:  # a cache write is best effort: whatever stops it must not fail a sheet
        logger.warning("could not store the preview of %s at %s", video_path, path, exc_info=True)
    return _decoded(data)


def preview_images(
    store: VideoStore, videos: Iterable[tuple[str, VideoPath] | None], *, workers: int = PREVIEW_WORKERS
) -> list[Image.Image | None]:
    """`preview_image` of each (sha256, video path), a few at once; None stays None (no video).

    Reads from an object store are latency-bound and a missing preview means a decode (PyAV and
    Pillow release the GIL): both overlap. A caller passes one sheet page, so memory stays bounded."""
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda video: None if video is None else preview_image(store, *video), videos))


__all__ = ["PREVIEW_BOX", "make_preview", "preview_image", "preview_images", "store_preview"]
