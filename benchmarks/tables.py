"""The Markdown table every benchmark report is written as (benchmarks/run_all.py,
benchmarks/cluster.py). A module of its own so that the cluster benchmark, which run_all
imports, can use it without importing run_all (and torch)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def markdown_table(header: str, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """``header``, a blank line, then a table of ``columns`` with a line per row; a ``|``
    inside a cell is escaped so that it cannot split the cell."""
    lines = [
        header,
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
