"""Drafts -> `CatalogRequest`s: each generation validated field by field, its media identified by
content, its seed derived when absent, its key and price computed; duplicates reported."""

from __future__ import annotations

from dataclasses import dataclass

from wan_pipeline.catalog.drafts import CATALOG_TO_REQUEST, REQUEST_TO_CATALOG, Draft
from wan_pipeline.catalog.limits import CHARACTERS_ALLOWED, character_problem
from wan_pipeline.catalog.media import Media, MediaResolver, media_allowed
from wan_pipeline.catalog.model import CatalogRequest
from wan_pipeline.catalog.problems import ProblemLog, shown
from wan_pipeline.models import (
    DEFAULT_MODEL,
    MODELS,
    VideoRequest,
    check_request_fields,
    derive_seed,
    request_key,
)
from wan_pipeline.pricing import PriceTable, PriceUnknown
from wan_pipeline.sources import MediaError


@dataclass
class BuildContext:
    name: str
    file: str
    media: MediaResolver
    prices: PriceTable
    log: ProblemLog


def build_request(draft: Draft, ctx: BuildContext) -> CatalogRequest | None:
    """Validate one generation; None (with its problems logged) when it is not a valid request."""
    values = {name: value for name, value in draft.fields.values.items() if value is not None}  # null = unset
    where = draft.fields.where
    problems_before = ctx.log.reported

    # Before anything reads a value: a control character in a path or prompt is never sent or opened.
    for name, value in values.items():
        if isinstance(value, str) and (problem := character_problem(name, value)):
            ctx.log.add(where[name], problem, field=name, value=value, allowed=CHARACTERS_ALLOWED)
    if ctx.log.reported > problems_before:
        return None

    model = values.get("model", DEFAULT_MODEL)
    if not isinstance(model, str) or model not in MODELS:
        ctx.log.bad_value(where.get("model", draft.location), "model", model, " | ".join(MODELS))
        return None
    spec = MODELS[model]

    fields = {CATALOG_TO_REQUEST.get(name, name): value for name, value in values.items()}
    media: dict[str, Media | None] = {"image": None, "audio": None}
    for kind in media:
        ref = values.get(kind)
        if not isinstance(ref, str) or not ref:
            continue  # absent or not text: check_request_fields reports it
        try:
            media[kind] = ctx.media.resolve(ref, kind, spec)
            fields[CATALOG_TO_REQUEST[kind]] = media[kind].url
        except MediaError as exc:
            ctx.log.add(where[kind], f"{kind}: got {shown(ref)}: {exc}", field=kind, value=ref,
                        allowed=media_allowed(kind, spec))

    for problem in check_request_fields(spec, fields):
        name = REQUEST_TO_CATALOG.get(problem.field, problem.field)
        ctx.log.bad_value(where.get(name, draft.location), name, problem.value, problem.allowed)
    image, audio = media["image"], media["audio"]
    if ctx.log.reported > problems_before or image is None:
        return None

    request = VideoRequest(**fields)
    audio_identity = audio.identity if audio else None
    seed_derived = request.seed is None
    if seed_derived:
        request = request.with_seed(derive_seed(request, image.identity, audio_identity))
    try:
        usd = ctx.prices.estimate_usd(request.model, request.resolution, request.duration)
    except PriceUnknown as exc:
        ctx.log.add(where.get("resolution", draft.location), f"resolution: {exc}", field="resolution",
                    value=request.resolution, allowed=f"a resolution priced in {ctx.prices.origin}")
        return None
    return CatalogRequest(
        prompt_set=ctx.name,
        source_file=ctx.file,
        source_line=draft.line,
        request=request,
        image_ref=values["image"],
        image_sha256=image.sha256,
        audio_ref=values.get("audio"),
        audio_sha256=audio.sha256 if audio else None,
        seed_derived=seed_derived,
        request_key=request_key(request, image.identity, audio_identity),
        estimated_usd=usd,
    )


def without_duplicates(requests: list[CatalogRequest], log: ProblemLog, unit: str) -> list[CatalogRequest]:
    """Keep the first of each request_key; report the others (the same key is the same paid video)."""
    first: dict[str, CatalogRequest] = {}
    for request in requests:
        earlier = first.setdefault(request.request_key, request)
        if earlier is not request:
            log.add(
                f"{unit} {request.source_line}",
                f"duplicate generation: request_key {request.request_key} is also produced by "
                f"{unit} {earlier.source_line}",
                field="request_key", value=request.request_key, allowed="each generation once per set",
            )
    return list(first.values())
