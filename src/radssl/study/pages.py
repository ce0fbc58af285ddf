"""Self-contained HTML pages from Jinja2 templates (package data in ``radssl/templates``).

Why templates: the page skeleton, CSS and the markup of tables, figures and notes live in one place, shared by the
study report, the bake-off and the benchmark pages, instead of f-strings repeated in each. Autoescaping is on:
plain strings are escaped, pre-built fragments are passed as :class:`markupsafe.Markup`.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup


@dataclass(frozen=True)
class EmbeddedFigure:
    """A rendered figure: base64 PNG plus plain-text alt and caption (escaped when the page is rendered)."""

    png_base64: str
    alt: str
    caption: str

    @classmethod
    def from_matplotlib(cls, fig: Any, alt: str, caption: str) -> "EmbeddedFigure":
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=130, facecolor="white", metadata={"Software": None})
        return cls(base64.b64encode(buffer.getvalue()).decode("ascii"), alt, caption)


@dataclass(frozen=True)
class Section:
    anchor: str
    title: str
    html: str


@lru_cache(maxsize=1)
def environment() -> Environment:
    return Environment(loader=PackageLoader("radssl", "templates"),
                       autoescape=select_autoescape(("html", "j2", "html.j2")), keep_trailing_newline=False)


def _macro(name: str) -> Any:
    return getattr(environment().get_template("macros.html.j2").module, name)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = (),
          caption: str | None = None) -> str:
    """An HTML table; cells and headers are pre-escaped HTML; ``numeric`` column indices are right-aligned."""
    return str(_macro("table")([Markup(h) for h in headers], [[Markup(c) for c in r] for r in rows],
                               tuple(numeric), Markup(caption) if caption else None))


def figure(fig: EmbeddedFigure) -> str:
    return str(_macro("figure")(fig))


def note(text: str) -> str:
    """A highlighted note; ``text`` is pre-escaped HTML."""
    return str(_macro("note")(Markup(text)))


def render_page(*, title: str, heading: str, subtitle: str, sections: Sequence[Section], footer: str,
                kpis: Sequence[tuple[str, str]] = (), notes: Sequence[str] = ()) -> str:
    """The whole page. Section bodies are pre-built HTML; every other argument is plain text."""
    page = environment().get_template("base.html.j2").render(
        title=title, heading=heading, subtitle=subtitle, footer=footer, kpis=list(kpis), notes=list(notes),
        sections=[Section(s.anchor, s.title, Markup(s.html)) for s in sections])
    return page + "\n"
