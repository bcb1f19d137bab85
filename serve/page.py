"""The page at `/`: one static HTML file with its CSS and JavaScript inline (serve/page/)."""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def page_html() -> str:
    return (resources.files("serve") / "page" / "index.html").read_text(encoding="utf-8")
