"""Media references of a catalog: where local files may live, and each reference resolved and
inspected once per load.

Allowed roots -- a local media path must resolve (symlinks followed) inside one of:
  1. the folder holding the set file, and below;
  2. `data/` under the current working directory (the project's media folder: the sample
     catalog's `../../data/images/...` lands there when run from the project root), and the
     `data/` of the project a set file belongs to when it lives in `<project>/configs/<folder>/`
     (so a catalog elsewhere, laid out like this one, works from any working directory);
  3. the `allowed_roots` the caller passes (the CLI and the Dagster resource pass
     `WAN_PIPELINE_ALLOWED_ROOTS` from settings: this package reads no environment).
Anything else (`../../etc/passwd`, `/etc/passwd`) is an error, never an upload. The check itself is
`sources.resolve_local_path`, the one the client uses too. fsspec URLs that reach the local disk by
another name (`local://`, chained `a::b` URLs) are refused: write a path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from wan_pipeline import sources
from wan_pipeline.catalog.discovery import display_path
from wan_pipeline.models import ModelSpec
from wan_pipeline.sources import MediaError


def project_data_dir(set_file: Path) -> Path | None:
    """`<project>/data` for a set file laid out as `<project>/configs/prompt_sets/<set>.yaml`."""
    folder = Path(set_file).resolve().parent
    return folder.parent.parent / "data" if folder.parent.name == "configs" else None


def allowed_roots_for(set_file: Path, extra_roots: Sequence[Path] = ()) -> list[Path]:
    """The roots local media of `set_file` may live under (see the module doc), never empty."""
    project_data = project_data_dir(set_file)
    return [
        Path(set_file).resolve().parent,
        Path.cwd() / "data",
        *([project_data] if project_data else []),
        *(Path(root) for root in extra_roots),
    ]


@dataclass(frozen=True)
class Media:
    url: str  # what the request carries: the resolved absolute path, or the URL / data URI as given
    identity: str  # "sha256:<hex>" or "url:<url>"
    sha256: str | None


class MediaResolver:
    """Resolves, reads and inspects media references, caching by reference and by resolved file so
    10,000 rows over 20 images cost 20 reads."""

    def __init__(self, base_dir: Path, roots: Sequence[Path]):
        self.base_dir = base_dir
        self.roots = list(roots)
        self._by_ref: dict[tuple[str, str, str], Media | MediaError] = {}
        self._by_target: dict[tuple[str, str, str], Media | MediaError] = {}

    def resolve(self, ref: str, kind: str, spec: ModelSpec) -> Media:
        """The media for `ref`; raises MediaError with a sentence saying what is wrong."""
        return self._cached(self._by_ref, (kind, spec.name, ref), lambda: self._resolve(ref, kind, spec))

    @staticmethod
    def _cached(cache: dict[tuple[str, str, str], Media | MediaError], key: tuple[str, str, str],
                compute: Callable[[], Media]) -> Media:
        if key not in cache:
            try:
                cache[key] = compute()
            except MediaError as exc:
                cache[key] = exc
        outcome = cache[key]
        if isinstance(outcome, MediaError):
            raise outcome
        return outcome

    def _resolve(self, ref: str, kind: str, spec: ModelSpec) -> Media:
        if sources.is_http_url(ref):
            return Media(ref, f"url:{ref}", None)  # the provider fetches it
        if sources.is_data_uri(ref):
            return self._inspected(ref, ref, kind, spec)
        local = self._local_path(ref)
        if local is None:
            return self._inspected(ref, ref, kind, spec)
        try:
            path = sources.resolve_local_path(local, self.base_dir, self.roots)
            is_file = path.is_file()
        except MediaError:
            roots = ", ".join(dict.fromkeys(display_path(root) for root in self.roots))
            raise MediaError(f"outside the allowed roots ({roots})") from None
        except (OSError, ValueError, RuntimeError) as exc:  # NUL bytes, names too long, unknown ~user
            raise MediaError(f"not a usable path: {exc}") from None
        if not is_file:
            raise MediaError(f"no such file: {display_path(path)}")
        return self._inspected(str(path), str(path), kind, spec)

    @staticmethod
    def _local_path(ref: str) -> str | None:
        """The local path a reference names; None for a remote fsspec URL; refuses local disguises."""
        if not sources.has_scheme(ref):
            return ref
        protocol, rest = ref.split("://", 1)
        if protocol.lower() == "file":
            return rest
        if "::" in ref:
            raise MediaError("chained fsspec URLs are not supported: name the file directly")
        try:
            filesystem = fsspec.get_filesystem_class(protocol)
        except (ValueError, ImportError, AttributeError) as exc:
            raise MediaError(f"unsupported URL scheme {protocol!r}: {exc}") from None
        if issubclass(filesystem, LocalFileSystem):
            raise MediaError(f"{protocol}:// reaches the local disk: write a path instead")
        return None

    def _inspected(self, url: str, readable: str, kind: str, spec: ModelSpec) -> Media:
        def inspect() -> Media:
            _, info = sources.load_media(readable, kind, spec, allowed_roots=self.roots)
            return Media(url, f"sha256:{info.sha256}", info.sha256)

        return self._cached(self._by_target, (kind, spec.name, readable), inspect)


def media_allowed(kind: str, spec: ModelSpec) -> str:
    if kind == "image":
        limits = (f"{' | '.join(spec.image_formats)}, each side {spec.image_min_side}-{spec.image_max_side} px, "
                  f"at most {spec.image_max_bytes} bytes")
    else:
        limits = (f"{' | '.join(spec.audio_formats)}, {spec.audio_min_seconds:g}-{spec.audio_max_seconds:g} s, "
                  f"at most {spec.audio_max_bytes} bytes")
    return f"a file under an allowed root, an fsspec URL or an http(s) URL ({limits})"
