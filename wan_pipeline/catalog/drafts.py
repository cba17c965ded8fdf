"""Catalog field names, and generations as written (`Draft`), before they are validated.

Catalog field names are the request fields, except that media are named `image` and `audio` (they
hold a reference as written, not what goes on the wire).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from wan_pipeline.models import REQUEST_FIELDS

REQUEST_TO_CATALOG = {"image_url": "image", "audio_url": "audio"}
CATALOG_TO_REQUEST = {catalog: request for request, catalog in REQUEST_TO_CATALOG.items()}
CATALOG_FIELDS = tuple(REQUEST_TO_CATALOG.get(name, name) for name in REQUEST_FIELDS)


@dataclass
class Fields:
    """Catalog field values and where each was written (defaults, item key, grid entry, CSV row)."""

    values: dict[str, Any] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)

    def set(self, name: str, value: Any, where: str) -> None:
        self.values[name] = value
        self.where[name] = where

    def overlaid(self, other: Fields) -> Fields:
        return Fields({**self.values, **other.values}, {**self.where, **other.where})

    def copy(self) -> Fields:
        return Fields(dict(self.values), dict(self.where))


@dataclass
class Draft:
    location: str  # where the generation is written: the item, the grid, the CSV row
    line: int
    fields: Fields
