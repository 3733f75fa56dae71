"""Markdown tables for the book's pages: one helper, so that no page formats pipes by hand.

``markdown_table`` returns a ``str`` that notebooks display as Markdown (it has
``_repr_markdown_``), so a cell that ends with it shows a rendered table, and
``myst_nb.glue`` can paste it into the text.
"""
from __future__ import annotations


class MarkdownTable(str):
    """A Markdown table: prints as its source, displays in a notebook as a table."""

    def _repr_markdown_(self) -> str:
        return str(self)


_RULES = {"l": "---", "r": "---:", "c": ":---:"}


def markdown_table(header, rows, align: str | None = None) -> MarkdownTable:
    """``header`` (n names) over ``rows`` (each n values, shown with ``str``); ``align`` is one of
    l/r/c per column ("lrr"), left-aligned by default. A ``|`` inside a value is escaped."""
    header = [str(h) for h in header]
    align = align or "l" * len(header)
    if len(align) != len(header) or set(align) - set(_RULES):
        raise ValueError(f"align must give one of l, r, c for each of the {len(header)} columns, got {align!r}")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(_RULES[a] for a in align) + "|"]
    for row in rows:
        cells = [str(value).replace("|", "\\|") for value in row]
        if len(cells) != len(header):
            raise ValueError(f"a row has {len(cells)} values for {len(header)} columns: {row!r}")
        lines.append("| " + " | ".join(cells) + " |")
    return MarkdownTable("\n".join(lines))
