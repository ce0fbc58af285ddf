"""Self-contained HTML pages from Jinja2 templates (package data in ``radssl/templates``).

Why templates: the page skeleton, CSS and the markup of tables, figures and notes live in one place, shared by the
study report, the bake-off and the benchmark pages, instead of f-strings repeated in each. Autoescaping is on:
plain strings are escaped, pre-built fragments are passed as :class:`markupsafe.Markup`.

Benchmark pages (``benchmarks/*.py``) pass no HTML at all: a :class:`PageSection` holds plain-text paragraphs,
:class:`Table` s of :class:`Cell` s, fine print, figures, bullets and preformatted text, and
:func:`render_benchmark_page` lays them out with ``benchmark.html.j2`` (the study report's skeleton and style).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from radssl.study.formatting import num, signed


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


# ------------------------------------------------------------------------------------------ benchmark pages
@dataclass(frozen=True)
class Cell:
    """A table cell of plain text: a value, optionally bold, with fine-print lines after it (``<small>``)."""

    value: str
    detail: tuple[str, ...] = ()
    strong: bool = False


@dataclass(frozen=True)
class Table:
    """A table of plain text; ``numeric`` column indices are right-aligned. Every row has one cell per header."""

    headers: Sequence[str]
    rows: Sequence[Sequence[Cell | str]]
    numeric: Sequence[int] = ()
    caption: str | None = None

    def __post_init__(self) -> None:
        for number, row in enumerate(self.rows):
            if len(row) != len(self.headers):
                raise ValueError(f"table {self.caption or self.headers[0]!r}: row {number} has {len(row)} cells "
                                 f"for {len(self.headers)} headers ({list(self.headers)})")
        object.__setattr__(self, "rows", [[c if isinstance(c, Cell) else Cell(str(c)) for c in row]
                                          for row in self.rows])
        object.__setattr__(self, "numeric", tuple(self.numeric))


@dataclass(frozen=True)
class Paragraph:
    """A paragraph of plain text, with an optional bold lead-in (``<b>lead</b>: text``)."""

    text: str
    lead: str = ""


@dataclass(frozen=True)
class PageSection:
    """One section of a benchmark page, laid out in this order: paragraphs, tables, fine print, figures, bullets,
    preformatted text (settings as JSON, say). Everything is plain text."""

    anchor: str
    title: str
    paragraphs: Sequence[Paragraph | str] = ()
    tables: Sequence[Table] = ()
    fine_print: Sequence[str] = ()
    figures: Sequence[EmbeddedFigure] = ()
    bullets: Sequence[str] = ()
    preformatted: Sequence[str] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "paragraphs", [p if isinstance(p, Paragraph) else Paragraph(p)
                                                for p in self.paragraphs])


def interval_cell(mean: float | None, low: float | None, high: float | None, *, digits: int = 3,
                  difference: bool = False, after: Sequence[str] = (), strong: bool = False) -> Cell:
    """``mean [low, high]`` as a cell (a difference is signed); ``after`` adds fine-print lines (a p-value, a
    second interval). Non-finite numbers read "–"; an interval with neither bound (one seed) is left out."""
    value = signed(mean, digits) if difference else num(mean, digits)
    shown = any(b is not None and math.isfinite(b) for b in (low, high))
    interval = (f"[{num(low, digits)}, {num(high, digits)}]",) if shown else ()
    return Cell(value, (*interval, *after), strong)


def machine_footer(machine: Mapping[str, Any], versions: Mapping[str, str] | None = None) -> list[str]:
    """The footer lines of a benchmark page: the machine it ran on (``benchmarks/common.py: machine()``), the load
    average at its start where recorded, and the package versions (``versions``, else the machine's own)."""
    description = machine.get("description") or (  # older result files hold the parts only
        f"{machine.get('cpu_count', '?')}-core CPU ({machine.get('cpu', 'model not recorded')}), "
        + (f"GPU {machine['gpu']}" if machine.get("gpu") else "no GPU")
        + (f"; torch threads {machine['torch_threads']}" if machine.get("torch_threads") else ""))
    lines = [f"Machine: {description}"
             + (f"; load average at start {machine['load_average_at_start']}"
                if machine.get("load_average_at_start") is not None else "")]
    versions = versions if versions is not None else machine.get("versions") or {}
    if versions:
        lines.append("Versions: " + ", ".join(f"{name} {version}" for name, version in versions.items()))
    return lines


def render_benchmark_page(*, title: str, heading: str, subtitle: str, sections: Sequence[PageSection],
                          machine: Mapping[str, Any], versions: Mapping[str, str] | None = None,
                          notes: Sequence[str] = (), footer: Sequence[str] = ()) -> str:
    """A benchmark's page: plain-text sections (escaped by the template) and a machine / versions footer, plus
    ``footer`` lines of the script's own (its total wall time, say)."""
    page = environment().get_template("benchmark.html.j2").render(
        title=title, heading=heading, subtitle=subtitle, kpis=[], notes=list(notes), sections=list(sections),
        footer_lines=[*footer, *machine_footer(machine, versions)])
    return page + "\n"
