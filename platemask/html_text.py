"""Text from data someone else wrote (photo keys, error messages, report fields), made safe to show
in the QA pages: HTML-escaped, and with the Unicode controls that reorder or hide text (bidi
overrides and isolates, marks, zero-width joiners) shown as visible ``\\u202e`` codes, so a key like
``gpj.\\u202eexe`` cannot pass for another file name."""
from __future__ import annotations

import html
import re

_CONTROLS = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f]")


def escape(value) -> str:
    """``value`` as text for an HTML page: escaped, controls made visible; None is empty."""
    if value is None:
        return ""
    return html.escape(_CONTROLS.sub(lambda m: f"\\u{ord(m.group()):04x}", str(value)))
