"""Untrusted text made safe to print: the one function every report, log line, exception message and
metadata value uses when it quotes a file name, a catalog value or something a provider said.

Catalog files are written by people and error messages come from a server over the internet, so
either may hold terminal escape sequences, newlines that forge extra report lines, bidi overrides
that reorder what is shown, characters that look like ASCII but are not, or megabytes of text.
`printable` turns any of it into one bounded line that shows what is really there.
"""

from __future__ import annotations

import unicodedata

# What a quoted value is cut to unless the caller asks for another bound (documented in the README).
DEFAULT_LIMIT = 200

_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Letters of other scripts that render like Latin ones (the common homoglyphs of Unicode's
# confusables list): shown by code point so "pаypal" (Cyrillic а) cannot pass for "paypal".
_LOOKALIKES = frozenset(
    "АВЕЅІЈКМНОРСТХУаеіјосрхуѕԁһԛԝ"  # Cyrillic
    "ΑΒΕΖΗΙΚΜΝΟΡΤΥΧαβγιικνορτυχω"  # Greek
    "ıȷɑɡ"  # Latin letters that read as other Latin letters
)


def _escaped(char: str) -> str:
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    point = ord(char)
    return f"\\x{point:02x}" if point < 0x100 else f"\\u{point:04x}" if point < 0x10000 else f"\\U{point:08x}"


def _needs_escape(char: str) -> bool:
    # Cc: C0/C1 controls (ESC, NUL, DEL...); Cf: format characters, which include the bidi
    # overrides and isolates and zero-width joiners; Zl/Zp: line and paragraph separators; Cs/Co/Cn:
    # surrogates, private use and unassigned code points, which no terminal shows faithfully.
    return unicodedata.category(char) in {"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"}


def _is_lookalike(char: str) -> bool:
    if char.isascii():
        return False
    if char in _LOOKALIKES:
        return True
    # Fullwidth forms, mathematical alphanumerics, ligatures: compatibility forms of ASCII.
    folded = unicodedata.normalize("NFKC", char)
    return folded != char and folded.isascii() and folded.isprintable()


def printable(value: object, limit: int = DEFAULT_LIMIT) -> str:
    """`value` as one line of at most `limit` shown characters plus a marker saying how much was cut.

    Control, format (bidi, zero-width) and separator characters are escaped (`\\x1b`, `\\n`,
    `\\u202e`); characters that look like ASCII letters are shown as their code point (`[U+0430]`);
    everything else (accents, CJK, emoji) is kept, so a prompt in any language stays readable.
    """
    text = value if isinstance(value, str) else str(value)
    shown: list[str] = []
    length = 0
    for index, char in enumerate(text):
        if _needs_escape(char):
            piece = _escaped(char)
        elif _is_lookalike(char):
            piece = f"[U+{ord(char):04X}]"
        else:
            piece = char
        if length + len(piece) > limit:
            return "".join(shown) + f"...[{len(text) - index} more chars]"
        shown.append(piece)
        length += len(piece)
    return "".join(shown)


def quoted(value: object, limit: int = DEFAULT_LIMIT) -> str:
    """`printable` in single quotes, for a value inside a sentence."""
    return f"'{printable(value, limit)}'"
