"""Collecting the problems of one file: each once, with values quoted short and escaped."""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Sequence
from typing import Any

from wan_pipeline.catalog.limits import QUOTE_LIMIT
from wan_pipeline.catalog.model import CatalogProblem
from wan_pipeline.safe_text import printable, quoted

# A bounded repr: a list of a million entries or a deeply nested mapping is shown by its first
# few entries, never built whole (the full repr of a large value costs its size in memory).
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple = 3, 4, 6, 6
_REPR.maxstring = _REPR.maxother = QUOTE_LIMIT


def shown(value: Any) -> str:
    """A catalog value as a problem quotes it: at most QUOTE_LIMIT characters, escaped, one line."""
    if isinstance(value, str):
        return quoted(value, QUOTE_LIMIT)
    return printable(_REPR.repr(value), QUOTE_LIMIT)


def suggestion(name: str, allowed: Sequence[str]) -> str:
    """` did you mean 'prompt'?` for the closest allowed name, or nothing when none is close."""
    close = difflib.get_close_matches(name, allowed, n=1)
    return f" did you mean {close[0]!r}?" if close else ""


class ProblemLog:
    """Problems of one file, each reported once (a bad default or grid value hits many generations)."""

    def __init__(self, file: str):
        self.file = file
        self._problems: list[CatalogProblem] = []
        self._seen: set[tuple[str | None, str]] = set()
        # Every report counts here, repeats included: "did this generation have a problem" must not
        # depend on whether an earlier generation already reported the same one.
        self.reported = 0

    def add(
        self,
        location: str | None,
        message: str,
        *,
        field: str | None = None,
        value: object = None,
        allowed: str | None = None,
    ) -> None:
        self.reported += 1
        if (location, message) not in self._seen:
            self._seen.add((location, message))
            self._problems.append(CatalogProblem(self.file, location, field, value, allowed, message))

    def bad_value(self, location: str | None, field: str, value: Any, allowed: str) -> None:
        # A required field left out (or set to null) is "missing": "got None" names no YAML or CSV.
        got = "missing" if value is None else f"got {shown(value)}"
        self.add(location, f"{field}: {got}, allowed: {allowed}", field=field, value=value, allowed=allowed)

    def unknown_key(self, location: str | None, key: Any, value: Any, allowed: Sequence[str], what: str) -> None:
        name = key if isinstance(key, str) else _REPR.repr(key)
        allowed_text = ", ".join(allowed)
        self.add(location, f"{printable(name, QUOTE_LIMIT)}: unknown {what},{suggestion(name, allowed)} "
                 f"allowed: {allowed_text}", field=name, value=value, allowed=allowed_text)

    def too_many(self, location: str | None, field: str, count: int, maximum: int, detail: str = "") -> None:
        """`field` plans more generations than one set may hold (counted, never expanded)."""
        self.add(location, f"{field}: expands to {count} generations{detail}, allowed: at most {maximum}",
                 field=field, value=count, allowed=f"at most {maximum} generations per set")

    def sorted(self) -> list[CatalogProblem]:
        """File-wide problems first, then by line/row, in discovery order within a line."""

        def position(problem: CatalogProblem) -> tuple[int, int]:
            if problem.location is None:
                return (0, 0)
            return (1, int(problem.location.rsplit(" ", 1)[1]))

        return sorted(self._problems, key=position)
