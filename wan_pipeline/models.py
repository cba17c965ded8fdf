"""What a video model accepts, and the typed request we send it.

The model name is data: a `ModelSpec` carries every enum, limit and price of one model, so a sibling
model on the same endpoint is one more registry entry, not a rewrite. `check_request_fields` is the
single validator used by the client (before any call) and by the catalog (before any spend).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from dataclasses import fields as dataclass_fields
from typing import Any

SEED_MAX = 2_147_483_647
CREDITS_PER_USD = 2_000_000


@dataclass(frozen=True)
class ModelSpec:
    """Everything the contract says about one model's create body."""

    name: str
    resolutions: tuple[str, ...]
    durations: tuple[int, ...]
    shot_types: tuple[str, ...]
    default_resolution: str
    default_duration: int
    prompt_max_chars: int
    negative_prompt_max_chars: int
    image_formats: tuple[str, ...]  # Pillow format names
    image_min_side: int
    image_max_side: int
    image_max_bytes: int
    audio_formats: tuple[str, ...]  # "wav", "mp3"
    audio_max_bytes: int
    audio_min_seconds: float
    audio_max_seconds: float
    # Observed processing time of 5 s at 1080p (~172 s); scaled by output seconds and pixels.
    reference_processing_seconds: float = 172.0

    def expected_processing_seconds(self, resolution: str, duration: int) -> float:
        """Best guess of queue + generation time, used to time the first poll."""
        pixel_factor = 1.0 if resolution == "1080p" else 0.6
        return self.reference_processing_seconds * (duration / 5) ** 0.5 * pixel_factor


WAN_2_6_I2V = ModelSpec(
    name="alibaba/wan-2-6-i2v",
    resolutions=("720p", "1080p"),
    durations=(5, 10, 15),
    shot_types=("single", "multi"),
    default_resolution="1080p",
    default_duration=10,
    prompt_max_chars=1500,
    negative_prompt_max_chars=500,
    image_formats=("JPEG", "PNG", "BMP", "WEBP"),
    image_min_side=360,
    image_max_side=2000,
    image_max_bytes=10 * 1024 * 1024,
    audio_formats=("wav", "mp3"),
    audio_max_bytes=15 * 1024 * 1024,
    audio_min_seconds=3.0,
    audio_max_seconds=30.0,
)

MODELS: dict[str, ModelSpec] = {WAN_2_6_I2V.name: WAN_2_6_I2V}
DEFAULT_MODEL = WAN_2_6_I2V.name


def get_model(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise RequestInvalid([FieldProblem("model", name, f"one of {sorted(MODELS)}")]) from None


@dataclass(frozen=True)
class FieldProblem:
    """One invalid field: what was given and what is allowed."""

    field: str
    value: Any
    allowed: str

    def __str__(self) -> str:
        shown = repr(self.value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        return f"{self.field}: got {shown}, allowed: {self.allowed}"


class RequestInvalid(ValueError):
    """A request that must not be sent: every problem is listed, not just the first."""

    def __init__(self, problems: list[FieldProblem]):
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


REQUEST_FIELDS = (
    "model",
    "prompt",
    "image_url",
    "audio_url",
    "resolution",
    "duration",
    "negative_prompt",
    "shot_type",
    "generate_audio",
    "seed",
    "enhance_prompt",
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_request_fields(spec: ModelSpec, fields: Mapping[str, Any]) -> list[FieldProblem]:
    """Problems with the scalar fields of a create body (media content is checked in `sources`)."""
    problems: list[FieldProblem] = []
    for name in fields:
        if name not in REQUEST_FIELDS:
            problems.append(FieldProblem(name, fields[name], f"a request field: {', '.join(REQUEST_FIELDS)}"))

    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        problems.append(FieldProblem("prompt", prompt, "a non-empty string"))
    elif len(prompt) > spec.prompt_max_chars:
        problems.append(
            FieldProblem("prompt", f"<{len(prompt)} characters>", f"at most {spec.prompt_max_chars} characters")
        )
    negative = fields.get("negative_prompt")
    if negative is not None:
        if not isinstance(negative, str):
            problems.append(FieldProblem("negative_prompt", negative, "a string"))
        elif len(negative) > spec.negative_prompt_max_chars:
            problems.append(
                FieldProblem(
                    "negative_prompt",
                    f"<{len(negative)} characters>",
                    f"at most {spec.negative_prompt_max_chars} characters",
                )
            )
    image = fields.get("image_url")
    if not isinstance(image, str) or not image:
        problems.append(FieldProblem("image_url", image, "an image path, fsspec URL, http(s) URL or data URI"))
    audio = fields.get("audio_url")
    if audio is not None and (not isinstance(audio, str) or not audio):
        problems.append(FieldProblem("audio_url", audio, "an audio path, fsspec URL, http(s) URL or data URI"))

    resolution = fields.get("resolution", spec.default_resolution)
    if resolution not in spec.resolutions:
        problems.append(FieldProblem("resolution", resolution, " | ".join(spec.resolutions)))
    duration = fields.get("duration", spec.default_duration)
    if not _is_int(duration) or duration not in spec.durations:
        problems.append(FieldProblem("duration", duration, " | ".join(str(d) for d in spec.durations) + " (seconds)"))
    shot_type = fields.get("shot_type", "single")
    if shot_type not in spec.shot_types:
        problems.append(FieldProblem("shot_type", shot_type, " | ".join(spec.shot_types)))
    for flag in ("generate_audio", "enhance_prompt"):
        if flag in fields and not isinstance(fields[flag], bool):
            problems.append(FieldProblem(flag, fields[flag], "true | false"))
    seed = fields.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed <= SEED_MAX):
        problems.append(FieldProblem("seed", seed, f"an integer 0..{SEED_MAX}"))
    return problems


@dataclass(frozen=True)
class VideoRequest:
    """One image-to-video create request.

    `image_url` / `audio_url` hold a reference: a local path, an fsspec URL, an http(s) URL or a
    data URI. The client turns local and fsspec references into data URIs when it sends them.
    Construction validates every field and raises `RequestInvalid` listing all problems.
    """

    prompt: str
    image_url: str
    model: str = DEFAULT_MODEL
    audio_url: str | None = None
    resolution: str = WAN_2_6_I2V.default_resolution
    duration: int = WAN_2_6_I2V.default_duration
    negative_prompt: str | None = None
    shot_type: str = "single"
    generate_audio: bool = True
    seed: int | None = None
    enhance_prompt: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        spec = get_model(self.model)
        problems = check_request_fields(spec, self.fields())
        if problems:
            raise RequestInvalid(problems)

    @property
    def spec(self) -> ModelSpec:
        return get_model(self.model)

    def fields(self) -> dict[str, Any]:
        """The request fields, omitting the optional ones that are unset."""
        # Not dataclasses.asdict: it deep-copies, and request keys for 100,000 rows call this often.
        values = {f.name: getattr(self, f.name) for f in dataclass_fields(self) if f.name != "extra"}
        return {k: v for k, v in values.items() if v is not None}

    def with_seed(self, seed: int) -> VideoRequest:
        return replace(self, seed=seed)

    def body(self, image_url: str, audio_url: str | None) -> dict[str, Any]:
        """The JSON body, with the media references already resolved to what goes on the wire."""
        body = self.fields()
        body["image_url"] = image_url
        if audio_url is not None:
            body["audio_url"] = audio_url
        else:
            body.pop("audio_url", None)
        body["duration"] = int(self.duration)
        return body


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def output_identity(
    request: VideoRequest, image_identity: str, audio_identity: str | None
) -> dict[str, Any]:
    """Everything that decides the output. Media are identified by content hash, not by path."""
    identity = request.fields()
    identity.pop("image_url")
    identity.pop("audio_url", None)
    identity["image"] = image_identity
    identity["audio"] = audio_identity
    identity.setdefault("negative_prompt", None)
    return identity


def request_key(request: VideoRequest, image_identity: str, audio_identity: str | None) -> str:
    """The same key is the same paid result: 32 hex chars of sha256 over the output identity."""
    if request.seed is None:
        raise ValueError("request_key needs a seed: derive one first (derive_seed)")
    digest = hashlib.sha256(canonical_json(output_identity(request, image_identity, audio_identity)).encode())
    return digest.hexdigest()[:32]


def derive_seed(request: VideoRequest, image_identity: str, audio_identity: str | None) -> int:
    """A deterministic seed for a request that names none, so reruns ask for the same output."""
    identity = output_identity(request.with_seed(0), image_identity, audio_identity)
    identity.pop("seed")
    digest = hashlib.sha256(("seed:" + canonical_json(identity)).encode()).digest()
    return int.from_bytes(digest[:8], "big") % (SEED_MAX + 1)


def usd_from_credits(credits: float | None) -> float | None:
    return None if credits is None else credits / CREDITS_PER_USD
