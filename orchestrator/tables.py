"""Tables whose numbers are never cut: the run summary and ``trialsync status`` at any width.

Why this module: rich shrinks every column of a table that is wider than the console, numbers
included, and marks the cut with an ellipsis -- ``11,4…`` records, a header ``extr…``. On an
80-column terminal, or whenever the output is piped (rich then assumes 80 columns), a reader got
numbers that look right and are wrong. Here every column except the *flexible* ones (names,
notes) gets a minimum width equal to its widest cell (header words and footer included), and only
flexible columns give way: they wrap or end in ``…``. When even that does not fit, a compact
layout without borders is tried, and when that does not fit either the caller is told (None) and
prints one line per row instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.console import JustifyMethod
from rich.table import Table
from rich.text import Text

#: a flexible column (a name) keeps at least this many cells before the layout gives up
FLEX_MIN = 8


@dataclass(frozen=True)
class Column:
    header: str
    justify: JustifyMethod = "left"
    flexible: bool = False  # may wrap or shorten (names, notes); the others are never cut
    max_width: int | None = None
    footer: str = ""


def cell_width(markup: str) -> int:
    """Printed width of a cell given in rich markup (``[green]ok[/]`` is 2 wide)."""
    return max((Text.from_markup(line).cell_len for line in markup.split("\n")), default=0)


def _min_width(col: Column, cells: list[str], wrap_header: bool = True) -> int:
    header = max((len(w) for w in col.header.split()), default=0) if wrap_header else len(col.header)
    return max([header, cell_width(col.footer), *(cell_width(c) for c in cells)])


def fitted_table(columns: list[Column], rows: list[list[str]], width: int, title: str | None = None,
                 show_footer: bool = False, **table_kw: Any) -> Table | None:
    """A table that fits ``width`` without cutting a fixed column, or None when none does.

    Fixed columns get exactly the width of their widest cell; their headers stay on one line if
    that fits, else wrap between words (``last`` / ``run``)."""
    by_col = [[r[i] for r in rows] for i in range(len(columns))]
    for wrap_header in (False, True):
        for layout in _LAYOUTS[1:] if wrap_header else _LAYOUTS:
            t = _build(columns, by_col, rows, title, show_footer, layout, table_kw, wrap_header)
            if _minimum(t, width) <= width:
                return t
    return None


#: tried in order: rich's default boxed table, then borderless with two spaces between columns,
#: then borderless with one (the header stays bold, so columns remain readable)
_LAYOUTS: tuple[dict[str, Any], ...] = (
    {},
    {"box": None, "pad_edge": False, "show_edge": False},
    {"box": None, "pad_edge": False, "show_edge": False, "collapse_padding": True},
)


def _build(columns: list[Column], by_col: list[list[str]], rows: list[list[str]], title: str | None,
           show_footer: bool, layout: dict[str, Any], table_kw: dict[str, Any], wrap_header: bool) -> Table:
    kw: dict[str, Any] = {"title": title, "title_justify": "left", "show_footer": show_footer, **table_kw, **layout}
    t = Table(**kw)
    for col, cells in zip(columns, by_col, strict=True):
        if col.flexible:
            natural = _min_width(col, cells)
            t.add_column(col.header, justify=col.justify, footer=col.footer,
                         no_wrap=False, overflow="ellipsis", min_width=min(FLEX_MIN, natural),
                         max_width=col.max_width, ratio=None)
        else:
            # a fixed width rich never shrinks: a cell (no wider than it) is never cut
            w = _min_width(col, cells, wrap_header)
            t.add_column(col.header, justify=col.justify, footer=col.footer,
                         no_wrap=False, overflow="fold", width=w, min_width=w)
    for r in rows:
        t.add_row(*r)
    return t


def _minimum(table: Table, width: int) -> int:
    """Narrowest rendering that keeps every fixed column whole (flexible ones at their minimum).

    Rich's own measurement cannot answer this: it counts a name's longest word as its minimum,
    although the name may be shortened."""
    cols = table.columns
    content = sum(c.min_width or 0 for c in cols)
    padding = sum(table._get_padding_width(i) for i in range(len(cols)))  # noqa: SLF001 - rich's layout rule
    return content + padding + table._extra_width  # noqa: SLF001
