"""Tables and progress notes for the CLI: rich when installed (the training extras), plain text otherwise.

``uniguard eval`` and ``uniguard bench`` of an exported model run in a venv made by ``make serve``
alone, which has no rich.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def _rich_available() -> bool:
    try:
        import rich  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], bold_last: bool = False) -> None:
    """A table on stdout: the first column left-aligned, the others right-aligned."""
    if _rich_available():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for i, h in enumerate(headers):
            table.add_column(h, justify="left" if i == 0 else "right")
        for k, row in enumerate(rows):
            table.add_row(*row, style="bold" if bold_last and k == len(rows) - 1 else None)
        Console(width=max(Console().width, 160)).print(table)
        return
    print(plain_table(title, headers, rows))


def plain_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = (
            str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "  ".join(padded)

    rule = "-" * len(line(headers))
    return "\n".join([title, rule, line(headers), rule, *(line(r) for r in rows), rule])


def note(message: str) -> None:
    """A progress note on stderr."""
    print(f"uniguard: {message}", file=sys.stderr, flush=True)
