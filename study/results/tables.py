"""A table independent of its format (:class:`Table`: typed columns, rows, a caption and notes) and
its renderings: Markdown, LaTeX booktabs, CSV and an HTML fragment (for the report). Accuracies are
shown in percent; ``mean ± std`` cells hold per-seed values (sample standard deviation, ddof=1)."""

from __future__ import annotations

import csv
import html
import io
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from study.errors import UserError


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and v == "")


FORMATS = {"markdown": "md", "latex": "tex", "csv": "csv"}
"""Table formats and their file extensions."""


@dataclass
class Column:
    """``kind``: ``text``, ``int``, ``num`` (``digits`` decimals, or 3 significant digits when None) or
    ``stat`` (a cell holds per-seed values, shown as mean ± std; CSV gets ``key_mean``/``key_std``).
    ``show``: ``all``, ``display`` (Markdown/LaTeX only) or ``csv``."""

    key: str
    title: str
    kind: str = "text"
    digits: int | None = 2
    bold_max: bool = False
    show: str = "all"


@dataclass
class Table:
    """A table independent of its format."""

    name: str
    columns: list[Column]
    rows: list[list[Any]]
    caption: str
    notes: list[str] = field(default_factory=list)
    breaks: list[int] = field(default_factory=list)
    """Row indices preceded by a rule (LaTeX only), e.g. between stage 1 and stage 2."""


def _stat(values: np.ndarray) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan


def _fixed(x: float, digits: int | None) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.{digits}f}" if digits is not None else f"{x:.3g}"


def _display(table: Table) -> tuple[list[Column], list[list[tuple[str, bool]]]]:
    """Cells as (text, bold) for Markdown and LaTeX. Bold: the best displayed mean per column, so
    values tied at the shown precision are all bold."""
    cols = [(i, c) for i, c in enumerate(table.columns) if c.show != "csv"]
    best: dict[int, float] = {}
    for i, c in cols:
        if c.bold_max:
            shown = [float(_fixed(_stat(r[i])[0], c.digits)) for r in table.rows if math.isfinite(_stat(r[i])[0])]
            if shown:
                best[i] = max(shown)
    out = []
    for r in table.rows:
        cells = []
        for i, c in cols:
            v, bold = r[i], False
            if c.kind == "stat":
                mean, std = _stat(v)
                text = _fixed(mean, c.digits) + (f" ± {_fixed(std, c.digits)}" if math.isfinite(std) else "")
                bold = i in best and math.isfinite(mean) and float(_fixed(mean, c.digits)) == best[i]
            elif c.kind == "num":  # a categorical searched parameter is shown as it is
                text = v if isinstance(v, str) and v else _fixed(None if _missing(v) else v, c.digits)
            elif c.kind == "int":
                text = "–" if _missing(v) else str(int(v))
            else:
                text = "" if _missing(v) else str(v)
            cells.append((text, bold))
        out.append(cells)
    return [c for _, c in cols], out


def _markdown(table: Table) -> str:
    cols, cells = _display(table)

    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    grid = [[esc(c.title) for c in cols]] + [[f"**{esc(t)}**" if b else esc(t) for t, b in r] for r in cells]
    widths = [max(len(row[j]) for row in grid) for j in range(len(cols))]
    rule = [(":" + "-" * (w - 1)) if c.kind == "text" else ("-" * (w - 1) + ":") for c, w in zip(cols, widths)]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(s.ljust(w) for s, w in zip(row, widths)) + " |"

    parts = [esc(table.caption), "", line(grid[0]), line(rule)] + [line(r) for r in grid[1:]]
    for n in table.notes:
        parts += ["", esc(n)]
    return "\n".join(parts) + "\n"


_LATEX_CHARS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "τ": r"$\tau$",
    "ρ": r"$\rho$",
    "–": "--",
    "—": "---",
    "−": "$-$",
    "<": r"$<$",
    ">": r"$>$",
    "≥": r"$\geq$",
    "≤": r"$\leq$",
    "×": r"$\times$",
    "|": r"$|$",
}


def latex_escape(text: str) -> str:
    """Text safe inside a LaTeX tabular or caption (special characters escaped, ± τ ρ as math)."""
    return "".join(_LATEX_CHARS.get(ch, ch) for ch in str(text))


def _latex(table: Table) -> str:
    cols, cells = _display(table)
    align = "".join("l" if c.kind == "text" else "r" if c.kind in ("int", "num") else "c" for c in cols)
    caption = " ".join([table.caption] + table.notes)

    def line(row: list[str]) -> str:
        return "    " + " & ".join(row) + r" \\"

    body = []
    for k, r in enumerate(cells):
        if k in table.breaks and k > 0:
            body.append(r"    \midrule")
        body.append(line([rf"\textbf{{{latex_escape(t)}}}" if b else latex_escape(t) for t, b in r]))
    label = re.sub(r"[^A-Za-z0-9:.-]+", "-", table.name)
    return (
        "\n".join(
            [
                r"\begin{table}[htbp]",
                r"  \centering",
                rf"  \caption{{{latex_escape(caption)}}}",
                rf"  \label{{tab:{label}}}",
                rf"  \begin{{tabular}}{{{align}}}",
                r"    \toprule",
                line([latex_escape(c.title) for c in cols]),
                r"    \midrule",
                *body,
                r"    \bottomrule",
                r"  \end{tabular}",
                r"\end{table}",
            ]
        )
        + "\n"
    )


def _plain(x: Any) -> str:
    if _missing(x) or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    if isinstance(x, (float, np.floating)):
        return format(float(x), ".8g")
    return str(x)


def _csv(table: Table) -> str:
    cols = [c for c in table.columns if c.show != "display"]
    head: list[str] = []
    for c in cols:
        head += [f"{c.key}_mean", f"{c.key}_std"] if c.kind == "stat" else [c.key]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head)
    index = {id(c): i for i, c in enumerate(table.columns)}
    for r in table.rows:
        out: list[str] = []
        for c in cols:
            v = r[index[id(c)]]
            if c.kind == "stat":
                out += [_plain(x) for x in _stat(v)]
            elif c.kind == "int":
                out.append("" if _missing(v) else str(int(v)))
            else:
                out.append(_plain(v))
        w.writerow(out)
    return buf.getvalue()


def _html(table: Table) -> str:
    """An HTML ``<table>`` with its caption, then its notes; every text escaped. The cells are the
    Markdown and LaTeX ones (:func:`_display`), so the report shows what ``study table`` prints."""
    cols, cells = _display(table)
    esc = html.escape
    align = ["text" if c.kind == "text" else "num" for c in cols]
    head = "".join(f'<th class="{a}">{esc(c.title)}</th>' for c, a in zip(cols, align))
    rows = []
    for r in cells:
        tds = "".join(
            f'<td class="{a}">' + (f"<strong>{esc(t)}</strong>" if b else esc(t)) + "</td>"
            for (t, b), a in zip(r, align)
        )
        rows.append(f"<tr>{tds}</tr>")
    notes = "".join(f'\n<p class="note">{esc(n)}</p>' for n in table.notes)
    return (
        f'<table class="study-table" data-kind="{esc(table.name)}">\n<caption>{esc(table.caption)}</caption>\n'
        f"<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table>" + notes + "\n"
    )


RENDERERS = {"markdown": _markdown, "latex": _latex, "csv": _csv, "html": _html}


def render(table: Table, fmt: str) -> str:
    """The table as ``markdown``, ``latex``, ``csv`` or ``html`` text."""
    if fmt not in RENDERERS:
        raise UserError(f"unknown table format {fmt!r}; valid: {', '.join(RENDERERS)}")
    return RENDERERS[fmt](table)
