"""Escaping untrusted text (labels, captions, concepts, names) for the site.

Everything a model wrote is untrusted: it may contain HTML, Markdown link or
image syntax, Jinja (``{{ }}``/``{% %}``), backticks or table pipes. The
pages embed such text only through :func:`text`, which turns every ASCII
punctuation character into a numeric character reference. Browsers show the
characters literally; Markdown, Jinja and mkdocs plugins see no syntax at all.
"""

from __future__ import annotations

import hashlib
import re
import string
from urllib.parse import quote

# Every ASCII punctuation character becomes "&#N;"; control characters become spaces.
_TABLE: dict[int, str] = {ord(c): f"&#{ord(c)};" for c in string.punctuation}
_TABLE.update({i: " " for i in range(32)})
_TABLE[127] = " "
for _c in ("\u2028", "\u2029", "\u0085"):
    _TABLE[ord(_c)] = " "

_SLUG_OK = re.compile(r"[^A-Za-z0-9_.-]")


def text(value: object) -> str:
    """``value`` as inert text for HTML and Markdown (``None`` becomes an empty string)."""
    if value is None:
        return ""
    return str(value).translate(_TABLE)


def number(value: float | int | None, digits: int = 3) -> str:
    """A number for display (``-`` when missing); numbers are never untrusted text."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.{digits}f}"
    return str(int(value))


def slug(name: str) -> str:
    """A file-name-safe, collision-free slug for a model or layer name.

    Names made only of ``[A-Za-z0-9_.-]`` (and not starting with a dot) are
    kept; any other name gets its unsafe characters replaced and a short hash
    of the original appended, so two names never share a slug.
    """
    safe = _SLUG_OK.sub("_", name)
    if safe == name and name and not name.startswith("."):
        return name
    digest = hashlib.blake2b(name.encode(), digest_size=4).hexdigest()
    return f"{safe.lstrip('.')[:60]}-{digest}"


def url(path: str) -> str:
    """A relative URL for a site path, percent-encoded and safe inside an attribute."""
    return quote(path, safe="/._-~")
