"""Check a create body the way the provider does, answering with zod-style issues.

The provider validates bodies with zod: unknown keys are ignored, `null` is not "absent", and each
problem becomes an issue `{"code", "path", "message", ...}` with messages such as
`Invalid enum value. Expected '720p' | '1080p', received '480p'` or `Required`. Enum values and
media limits come from the shared `ModelSpec`; media content is checked with `wan_pipeline.sources`.
Prompt lengths are not enforced: upstream truncates long prompts (see the contract).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from wan_pipeline.models import MODELS, SEED_MAX, ModelSpec, canonical_json
from wan_pipeline.sources import (
    MediaError,
    MediaInfo,
    inspect_audio,
    inspect_image,
    is_data_uri,
    is_http_url,
    read_bytes,
)

Issue = dict[str, Any]


class BodyInvalid(ValueError):
    """A body the provider would refuse with `400 Body validation error!`."""

    def __init__(self, issues: list[Issue]):
        self.issues = issues
        super().__init__(
            "; ".join(f"{'.'.join(map(str, i['path'])) or 'body'}: {i['message']}" for i in issues)
        )


@dataclass(frozen=True)
class InlineMedia:
    """Media sent inline as a data URI, already decoded and inspected."""

    data: bytes = field(repr=False)
    info: MediaInfo


@dataclass(frozen=True)
class CreateRequest:
    """A valid create body, normalised (defaults applied, `duration` an int)."""

    model: str
    prompt: str
    resolution: str
    duration: int
    shot_type: str
    generate_audio: bool
    enhance_prompt: bool
    seed: int | None
    negative_prompt: str | None
    image: InlineMedia | None  # None: an http(s) URL the emulator cannot fetch (see image_remote_url)
    image_remote_url: str | None
    audio: InlineMedia | None
    audio_remote_url: str | None
    body_sha256: str  # sha256 of the body's canonical JSON, as sent (before defaults)

    @property
    def has_audio(self) -> bool:
        # generate_audio is ignored when audio is supplied (contract).
        return self.audio is not None or self.audio_remote_url is not None or self.generate_audio


def js_type(value: Any) -> str:
    """The type name zod reports for a JSON value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _shown(value: Any) -> str:
    return f"'{value}'" if isinstance(value, str) else json.dumps(value)


def issue(path: Sequence[str | int], message: str, code: str = "custom", **details: Any) -> Issue:
    return {"code": code, "path": list(path), "message": message, **details}


def required_issue(name: str, expected: str) -> Issue:
    return issue([name], "Required", "invalid_type", expected=expected, received="undefined")


def type_issue(name: str | None, expected: str, value: Any) -> Issue:
    """`name` None is the body itself."""
    received = js_type(value)
    path = [] if name is None else [name]
    return issue(
        path,
        f"Expected {expected}, received {received}",
        "invalid_type",
        expected=expected,
        received=received,
    )


def enum_issue(name: str, options: Sequence[Any], value: Any) -> Issue:
    expected = " | ".join(_shown(option) for option in options)
    return issue(
        [name],
        f"Invalid enum value. Expected {expected}, received {_shown(value)}",
        "invalid_enum_value",
        options=list(options),
        received=value,
    )


def parse_create_body(raw: bytes) -> CreateRequest:
    """Decode and check a create body; raise `BodyInvalid` listing every problem found."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BodyInvalid([issue([], f"Invalid JSON body: {exc}", "invalid_json")]) from None
    if not isinstance(body, dict):
        raise BodyInvalid([type_issue(None, "object", body)])
    # The model selects the schema, so nothing else can be checked without a known one.
    if "model" not in body:
        raise BodyInvalid([required_issue("model", "string")])
    if body["model"] not in MODELS:
        raise BodyInvalid([enum_issue("model", sorted(MODELS), body["model"])])
    spec = MODELS[body["model"]]

    issues: list[Issue] = []
    checked = _Fields(body, issues)
    prompt = checked.string("prompt", required=True)
    negative_prompt = checked.string("negative_prompt")
    resolution = checked.enum("resolution", spec.resolutions, spec.default_resolution)
    shot_type = checked.enum("shot_type", spec.shot_types, "single")
    duration = checked.duration(spec)
    generate_audio = checked.boolean("generate_audio", True)
    enhance_prompt = checked.boolean("enhance_prompt", True)
    seed = checked.seed()
    image, image_url = checked.media("image_url", lambda data: inspect_image(data, spec), required=True)
    audio, audio_url = checked.media("audio_url", lambda data: inspect_audio(data, spec))
    if issues:
        raise BodyInvalid(issues)
    return CreateRequest(
        model=spec.name,
        prompt=prompt,
        resolution=resolution,
        duration=duration,
        shot_type=shot_type,
        generate_audio=generate_audio,
        enhance_prompt=enhance_prompt,
        seed=seed,
        negative_prompt=negative_prompt,
        image=image,
        image_remote_url=image_url,
        audio=audio,
        audio_remote_url=audio_url,
        body_sha256=hashlib.sha256(canonical_json(body).encode()).hexdigest(),
    )


@dataclass
class _Fields:
    """Field checkers that append issues and return a usable value (the default) on failure."""

    body: dict[str, Any]
    issues: list[Issue]

    def string(self, name: str, *, required: bool = False) -> Any:
        if name not in self.body:
            if required:
                self.issues.append(required_issue(name, "string"))
            return None
        value = self.body[name]
        if not isinstance(value, str):
            self.issues.append(type_issue(name, "string", value))
        elif required and not value:
            self.issues.append(
                issue(
                    [name],
                    "String must contain at least 1 character(s)",
                    "too_small",
                    minimum=1,
                    type="string",
                )
            )
        return value

    def enum(self, name: str, options: Sequence[str], default: str) -> str:
        value = self.body.get(name, default)
        if value not in options:
            self.issues.append(enum_issue(name, options, value))
            return default
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.body.get(name, default)
        if not isinstance(value, bool):
            self.issues.append(type_issue(name, "boolean", value))
            return default
        return value

    def duration(self, spec: ModelSpec) -> int:
        # Docs examples send "5": numeric strings are accepted like numbers.
        value = self.body.get("duration", spec.default_duration)
        number = value
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                number = None
        if number is None or not _is_json_number(number):
            self.issues.append(type_issue("duration", "number", value))
        elif number not in spec.durations:
            self.issues.append(enum_issue("duration", spec.durations, value))
        else:
            return int(number)
        return spec.default_duration

    def seed(self) -> int | None:
        if "seed" not in self.body:
            return None
        value = self.body["seed"]
        if not _is_json_number(value):
            self.issues.append(type_issue("seed", "number", value))
        elif not float(value).is_integer():
            self.issues.append(
                issue(
                    ["seed"],
                    "Expected integer, received float",
                    "invalid_type",
                    expected="integer",
                    received="float",
                )
            )
        elif value < 0:
            self.issues.append(
                issue(["seed"], "Number must be greater than or equal to 0", "too_small", minimum=0)
            )
        elif value > SEED_MAX:
            self.issues.append(
                issue(
                    ["seed"], f"Number must be less than or equal to {SEED_MAX}", "too_big", maximum=SEED_MAX
                )
            )
        else:
            return int(value)
        return None

    def media(
        self, name: str, inspect: Callable[[bytes], MediaInfo], *, required: bool = False
    ) -> tuple[InlineMedia | None, str | None]:
        """(inline media, remote URL): data URIs are decoded and inspected, http(s) URLs kept as is."""
        if name not in self.body:
            if required:
                self.issues.append(required_issue(name, "string"))
            return None, None
        value = self.body[name]
        if not isinstance(value, str):
            self.issues.append(type_issue(name, "string", value))
        elif is_http_url(value):
            return None, value
        elif not is_data_uri(value):
            self.issues.append(issue([name], "Invalid url", "invalid_string", validation="url"))
        elif not value.split(",", 1)[0].endswith(";base64"):
            self.issues.append(issue([name], "Invalid data URI: expected data:<mime>;base64,<data>"))
        else:
            try:
                data = read_bytes(value)
                return InlineMedia(data, inspect(data)), None
            except MediaError as exc:
                self.issues.append(issue([name], f"Invalid {name.removesuffix('_url')}: {exc}"))
        return None, None


def _is_json_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value  # NaN != NaN
