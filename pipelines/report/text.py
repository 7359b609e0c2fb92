"""Text as the page shows it, shared by the charts' labels, the galleries and the page."""

from __future__ import annotations

from typing import Any


def shorten(text: str | None, n: int) -> str:
    """`text` on one line, cut to `n` characters with an ellipsis."""
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


def fmt(v: Any) -> str:
    """A value in a caption or a table: 4 significant digits, thousands separators."""
    if v is None:
        return "null"
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def slug(text: str) -> str:
    """An HTML id: every run of characters other than ASCII letters, digits, _ and - becomes one
    '-', without leading or trailing '-'."""
    out: list[str] = []
    for ch in text:
        keep = ch.isascii() and (ch.isalnum() or ch in "_-")
        if keep:
            out.append(ch)
        elif not out or out[-1] != "\0":
            out.append("\0")
    return "".join(out).replace("\0", "-").strip("-")
