"""Markdown tables for results printed by the notebook and the benchmarks."""
from __future__ import annotations

from typing import Sequence


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[object]], numbers: bool = True) -> str:
    """An aligned Markdown table: first column left-aligned, the others right-aligned where they hold
    `numbers`, else left-aligned too."""
    cells = [[str(c) for c in columns]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]

    def line(r):
        return "| " + " | ".join(c.rjust(w) if i and numbers else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
    rule = "|" + "|".join("-" * (w + 1) + (":" if i and numbers else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


class Table:
    """Rows of a comparison; shows as a Markdown table in Jupyter and as aligned text elsewhere."""

    def __init__(self, columns: list[str], rows: list[list[str]], numbers: bool = True):
        self.columns, self.rows, self.numbers = columns, rows, numbers

    def __str__(self) -> str:
        return markdown_table(self.columns, self.rows, self.numbers)

    __repr__ = _repr_markdown_ = __str__
