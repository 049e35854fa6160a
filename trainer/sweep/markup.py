"""One report table, rendered to markdown (terminal, summary.md) and HTML (summary.html) alike.

Its own module, below both :mod:`~xling.trainer.sweep.tables` and :mod:`~xling.trainer.sweep.claims`, so that
the claims can build their table and the tables can include it without importing each other both ways.
"""

from __future__ import annotations

import html
from dataclasses import dataclass


@dataclass
class Table:
    """One table, rendered to markdown (terminal, summary.md) and HTML (summary.html) alike."""

    title: str
    columns: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |"]
        lines.append("|" + "|".join("---" for _ in self.columns) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in self.rows
        )
        return f"<h3>{html.escape(self.title)}</h3><table><tr>{head}</tr>{body}</table>"
