"""Text from data someone else wrote (photo keys, error messages, report fields), made safe to show
in the QA pages: HTML-escaped, and every character a browser shows as nothing, as a plain space or
as a reordering of the text around it shown as a visible ``\\u202e`` code: bidi overrides, isolates
and marks (``gpj.\\u202eexe`` cannot pass for another file name), and the invisible ones (soft
hyphen, zero-width and tag characters, variation selectors, fillers, control characters, line
breaks and spaces other than U+0020): ``car\\u00ad0.jpg``, ``car\\U000e00410.jpg`` or ``car\\t0.jpg``
would otherwise show as the key ``car0.jpg`` (or ``car 0.jpg``) of another photo."""
from __future__ import annotations

import html
import re
import unicodedata

# invisible although their Unicode category is a letter or a mark (Default_Ignorable_Code_Point),
# and the blank braille pattern
_IGNORABLE = re.compile("[\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u2800\u3164\ufe00-\ufe0f\uffa0"
                        "\U000e0100-\U000e01ef]")
# control, format (bidi, zero-width, soft hyphen, tags), surrogate, private use, unassigned, line and
# paragraph separators, and spaces other than U+0020
_HIDDEN_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"}


def _code(ch: str) -> str:
    n = ord(ch)
    return f"\\u{n:04x}" if n <= 0xFFFF else f"\\U{n:08x}"


def _visible(ch: str) -> str:
    if ch == " " or not (unicodedata.category(ch) in _HIDDEN_CATEGORIES or _IGNORABLE.match(ch)):
        return ch
    return _code(ch)


def visible(value: str) -> str:
    """``value`` with every hidden or reordering character replaced by its code (not HTML-escaped)."""
    return "".join(_visible(c) if not c.isascii() or not c.isprintable() else c for c in value)


def escape(value) -> str:
    """``value`` as text for an HTML page: escaped, controls made visible; None is empty."""
    if value is None:
        return ""
    return html.escape(visible(str(value)))
