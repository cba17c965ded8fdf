"""What one prompt-set file may cost to read, and which characters its text may hold.

A catalog is written by people and may be wrong, huge or hostile. Every bound here is enforced
while the file is read (before the file is read, while YAML is composed, before anything is
expanded), so no catalog makes validation slow or large; each is reported as a located problem.
Callers change a bound by passing `CatalogLimits(...)` as `limits=` to `load_prompt_set`,
`validate_paths` or `validate_command`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from wan_pipeline.safe_text import printable

# A set file larger than this is refused from its size (stat) before a byte is read: 16 MiB holds
# the largest set allowed (MAX_GENERATIONS rows of ~80 bytes, or of 160-byte prompts) with room.
MAX_FILE_BYTES = 16 * 1024 * 1024
# Generations one set may plan, whatever builds them (items, seeds per item, the grid, CSV rows),
# counted before anything is expanded: a typo must not plan (and later buy) millions of videos.
MAX_GENERATIONS = 100_000
# YAML aliases: the nodes they would add if every alias were written out (each reference weighs
# the size of the node it names, aliases inside it included). Beyond this the document is refused
# while it is composed, so a 13-line "billion laughs" file costs a few milliseconds, not gigabytes.
MAX_ALIAS_NODES = 100_000
# How much of a catalog value a problem quotes, and how long one problem's line may grow.
QUOTE_LIMIT = 80
PATH_LIMIT = 200
MESSAGE_LIMIT = 1000

# Free-text fields where line breaks and tabs are natural (a multi-line YAML block prompt).
MULTILINE_FIELDS = ("prompt", "negative_prompt", "description")
# Forbidden in every text field: C0 and C1 control characters (NUL, ESC, DEL...), the line and
# paragraph separators, and the bidi embeddings, overrides and isolates that reorder what a reader
# sees (the "Trojan Source" characters). Zero-width joiners and the LRM/RLM marks stay allowed:
# emoji sequences and right-to-left scripts need them.
_UNSAFE = "\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_FORBIDDEN_IN_LINE = re.compile(f"[\t\n\r{_UNSAFE}]")
_FORBIDDEN_IN_TEXT = re.compile(f"[{_UNSAFE}]")
CHARACTERS_ALLOWED = "text without control or bidi-override characters (tab and newline only in prompts and descriptions)"


@dataclass(frozen=True)
class CatalogLimits:
    """The bounds a load enforces; the defaults are the module constants above."""

    max_file_bytes: int = MAX_FILE_BYTES
    max_generations: int = MAX_GENERATIONS
    max_alias_nodes: int = MAX_ALIAS_NODES


def character_problem(field: str, text: str) -> str | None:
    """The sentence saying which forbidden character `text` holds and where, or None when it is clean."""
    pattern = _FORBIDDEN_IN_TEXT if field in MULTILINE_FIELDS else _FORBIDDEN_IN_LINE
    found = pattern.search(text)
    if found is None:
        return None
    return (f"{field}: control character {printable(found.group())} at character {found.start() + 1}, "
            f"allowed: {CHARACTERS_ALLOWED}")


DEFAULT_LIMITS = CatalogLimits()
