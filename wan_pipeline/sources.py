"""Source media (images and audio): read, identify by content, check against a model's limits.

A reference is a local path, any fsspec URL (`s3://`, `memory://`, `file://`...), an http(s) URL or a
`data:` URI. http(s) URLs are passed to the provider unchanged (the provider fetches them); every
other reference is read here, its type detected from the bytes (never the extension), and sent as a
data URI. Local paths must resolve inside an allowed root (or the catalog's own folder) so a catalog
cannot upload arbitrary files; with neither given, nothing local is allowed.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import fsspec

from wan_pipeline.models import ModelSpec
from wan_pipeline.safe_text import printable, quoted

IMAGE_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "BMP": "image/bmp", "WEBP": "image/webp"}
AUDIO_MIME = {"wav": "audio/wav", "mp3": "audio/mpeg"}


ALLOWED_ROOTS_SETTING = "WAN_PIPELINE_ALLOWED_ROOTS"


class MediaError(ValueError):
    """A media reference that cannot be used: unreadable, wrong type, wrong size.

    Raised before any API call, so nothing was bought (`created` is False, like a create error's).
    """

    created: bool | None = False


class MediaChanged(MediaError):
    """The bytes about to be sent are not the ones the request key was computed from."""


@dataclass(frozen=True)
class MediaInfo:
    kind: str  # "image" | "audio"
    format: str  # "PNG", "JPEG"... for images; "wav" | "mp3" for audio
    mime: str
    size_bytes: int
    sha256: str
    width: int | None = None
    height: int | None = None
    duration_s: float | None = None


def is_http_url(ref: str) -> bool:
    return ref.startswith(("http://", "https://"))


def is_data_uri(ref: str) -> bool:
    return ref.startswith("data:")


def has_scheme(ref: str) -> bool:
    return "://" in ref


@functools.lru_cache(maxsize=256)
def _resolved_absolute_root(root: Path) -> Path:
    return root.resolve()


def _resolved_root(root: str | Path) -> Path:
    # Resolving a root is a few syscalls per path component, paid for every image of every create
    # otherwise (the largest single item of a submission's CPU): an absolute root is resolved once
    # per process (a relative one depends on the working directory, so it is resolved every time).
    # The media path itself is always resolved afresh and checked against the roots.
    path = Path(root).expanduser()
    return _resolved_absolute_root(path) if path.is_absolute() else path.resolve()


def resolve_local_path(ref: str, base_dir: Path | None, allowed_roots: Sequence[Path]) -> Path:
    """Resolve a local path (relative to `base_dir`) and refuse anything outside `base_dir` and
    `allowed_roots`. With neither, nothing local is allowed: fail closed, never "anything goes"."""
    roots = [_resolved_root(r) for r in allowed_roots]
    if base_dir is not None:
        roots.append(_resolved_root(base_dir))
    if not roots:
        raise MediaError(
            f"local media {quoted(ref)} is not allowed: no allowed roots are configured "
            f"(set {ALLOWED_ROOTS_SETTING} to the folders media may be read from)"
        )
    path = Path(ref).expanduser()
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    resolved = path.resolve()
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        shown = ", ".join(printable(root) for root in roots)
        raise MediaError(
            f"{quoted(ref)} resolves to {printable(resolved)}, outside the allowed roots [{shown}]"
        )
    return resolved


def read_bytes(ref: str, *, base_dir: Path | None = None, allowed_roots: Sequence[Path] = ()) -> bytes:
    """Read a local path, fsspec URL or data URI. http(s) URLs are not read here (see module doc)."""
    if is_data_uri(ref):
        try:
            _, payload = ref.split(",", 1)
            return base64.b64decode(payload, validate=True)
        except (ValueError, binascii.Error) as exc:
            raise MediaError(f"malformed data URI: {exc}") from None
    if is_http_url(ref):
        raise MediaError(f"{quoted(ref)} is an http(s) URL: the provider fetches it, it is not read locally")
    try:
        if has_scheme(ref) and not ref.startswith("file://"):
            with fsspec.open(ref, "rb") as handle:
                return handle.read()
        local = ref.removeprefix("file://")
        return resolve_local_path(local, base_dir, allowed_roots).read_bytes()
    except MediaError:
        raise
    except (OSError, ValueError, ImportError) as exc:
        raise MediaError(f"cannot read {quoted(ref)}: {exc.__class__.__name__}: {printable(exc)}") from None


def inspect_image(data: bytes, spec: ModelSpec) -> MediaInfo:
    """Identify an image by its content and check it against the model's limits."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > spec.image_max_bytes:
        raise MediaError(f"image is {len(data)} bytes, allowed at most {spec.image_max_bytes} bytes")
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, (width, height) = image.format, image.size
    except Image.DecompressionBombError:
        raise MediaError(
            f"image declares too many pixels; allowed: each side {spec.image_min_side}-{spec.image_max_side} px"
        ) from None
    except (UnidentifiedImageError, OSError) as exc:
        # Pillow's "cannot identify" message names the BytesIO object (a memory address): useless and unstable.
        reason = "unrecognised format" if isinstance(exc, UnidentifiedImageError) else exc
        raise MediaError(
            f"not a readable image ({reason}); allowed: {', '.join(spec.image_formats)}"
        ) from None
    if fmt not in spec.image_formats:
        raise MediaError(f"image format {fmt}, allowed: {', '.join(spec.image_formats)}")
    low, high = spec.image_min_side, spec.image_max_side
    if not (low <= width <= high and low <= height <= high):
        raise MediaError(f"image is {width}x{height} px, allowed: each side {low}-{high} px")
    return MediaInfo("image", fmt, IMAGE_MIME[fmt], len(data), sha256_hex(data), width=width, height=height)


def detect_audio_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "wav"
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        return "mp3"
    return None


def inspect_audio(data: bytes, spec: ModelSpec) -> MediaInfo:
    """Identify audio by its content (wav/mp3), measure its duration with PyAV, check the limits."""
    import av

    if len(data) > spec.audio_max_bytes:
        raise MediaError(f"audio is {len(data)} bytes, allowed at most {spec.audio_max_bytes} bytes")
    fmt = detect_audio_format(data)
    if fmt is None or fmt not in spec.audio_formats:
        raise MediaError(f"not a recognised audio file; allowed: {', '.join(spec.audio_formats)}")
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            duration = (container.duration or 0) / 1_000_000
    except (av.error.FFmpegError, ValueError) as exc:
        raise MediaError(f"unreadable {fmt} audio: {exc}") from None
    low, high = spec.audio_min_seconds, spec.audio_max_seconds
    if not low <= duration <= high:
        raise MediaError(f"audio lasts {duration:.2f} s, allowed: {low:g}-{high:g} s")
    return MediaInfo("audio", fmt, AUDIO_MIME[fmt], len(data), sha256_hex(data), duration_s=duration)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def to_data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def load_media(
    ref: str,
    kind: str,
    spec: ModelSpec,
    *,
    base_dir: Path | None = None,
    allowed_roots: Sequence[Path] = (),
) -> tuple[bytes, MediaInfo]:
    """Read and inspect one reference (not http(s)); `kind` is "image" or "audio"."""
    data = read_bytes(ref, base_dir=base_dir, allowed_roots=allowed_roots)
    info = inspect_image(data, spec) if kind == "image" else inspect_audio(data, spec)
    return data, info


@functools.lru_cache(maxsize=32)
def _local_data_uri(path: Path, size: int, mtime_ns: int, kind: str, spec: ModelSpec) -> tuple[str, str]:
    # Keyed by size and mtime too: an image edited in place is read, checked and hashed again.
    data = path.read_bytes()
    info = inspect_image(data, spec) if kind == "image" else inspect_audio(data, spec)
    return to_data_uri(data, info.mime), info.sha256


def wire_reference(
    ref: str, kind: str, spec: ModelSpec, *, base_dir: Path | None = None, allowed_roots: Sequence[Path] = ()
) -> tuple[str, str | None]:
    """What goes into the create body for a reference, with the sha256 of the bytes inlined.

    http(s) references go unchanged (the provider fetches them: no sha256 here); anything else
    becomes a data URI. A set usually reuses a few images across many generations: a local file is
    read, checked, hashed and encoded once (per content version), not once per create.
    """
    if is_http_url(ref):
        return ref, None
    if not is_data_uri(ref) and (not has_scheme(ref) or ref.startswith("file://")):
        path = resolve_local_path(ref.removeprefix("file://"), base_dir, allowed_roots)
        try:
            stat = path.stat()
            return _local_data_uri(path, stat.st_size, stat.st_mtime_ns, kind, spec)
        except OSError as exc:
            raise MediaError(
                f"cannot read {quoted(ref)}: {exc.__class__.__name__}: {printable(exc)}"
            ) from None
    data, info = load_media(ref, kind, spec, base_dir=base_dir, allowed_roots=allowed_roots)
    return to_data_uri(data, info.mime), info.sha256


def check_unchanged(
    ref: str, kind: str, sent_sha256: str | None, expected: Mapping[str, str | None] | None
) -> None:
    """Refuse to send media whose bytes differ from the ones the request key was computed from.

    `sent_sha256` is None for http(s) references: the provider fetches those, nothing here can check them.
    """
    wanted = (expected or {}).get(kind)
    if wanted is None or sent_sha256 is None:
        return
    if sent_sha256 != wanted.lower():
        raise MediaChanged(f"{kind} changed since it was validated: {printable(ref)}")
