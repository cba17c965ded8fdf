"""`printable`: any untrusted text as one bounded line that shows what is really there."""

from __future__ import annotations

import pytest

from wan_pipeline.safe_text import DEFAULT_LIMIT, printable, quoted


@pytest.mark.parametrize(
    "raw, shown",
    [
        ("\x1b[2Jred", "\\x1b[2Jred"),  # a terminal escape is shown, not obeyed
        ("two\nlines\r", "two\\nlines\\r"),  # a forged second report line stays on the first
        ("abc\u202edef", "abc\\u202edef"),  # a bidi override cannot reorder what follows
        ("p\u0430ypal", "p[U+0430]ypal"),  # Cyrillic а does not pass for Latin a
        ("café 東京 🎬", "café 東京 🎬"),  # other scripts and emoji stay readable
        ("\x00\x7f\x85", "\\x00\\x7f\\x85"),
    ],
)
def test_controls_bidi_and_lookalikes_are_made_visible(raw, shown):
    assert printable(raw) == shown


def test_long_text_is_cut_with_a_count_of_what_was_left_out():
    assert printable("x" * (DEFAULT_LIMIT + 50)) == "x" * DEFAULT_LIMIT + "...[50 more chars]"
    assert printable("y" * 10, limit=4) == "yyyy...[6 more chars]"
    assert printable("\x1b" * 10, limit=8) == "\\x1b\\x1b...[8 more chars]"  # escapes count as shown


def test_escaping_twice_changes_nothing():
    # Reports escape a message that may already hold escaped values: the result must not double up.
    once = printable("a\x1b\n\u0430" + "z" * 300)
    assert printable(once, limit=len(once)) == once


def test_quoted_wraps_a_value_for_a_sentence():
    assert quoted("a\nb") == "'a\\nb'"
    assert printable(12345) == "12345"
