"""Plain-text and Markdown tables for `qlora explain` and docs/tutorial.md (one formatter, so
the terminal and the tutorial show the same cells)."""
from __future__ import annotations

from collections.abc import Sequence


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], markdown: bool = False) -> str:
    """Right-aligned columns (the first left-aligned); `markdown=True` gives a pipe table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells[1:]])
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]])


def fmt_list(values: Sequence[float], digits: int = 2) -> str:
    """[0, 2.5, -1.43]: each value rounded to `digits`, trailing zeros dropped."""
    return "[" + ", ".join(f"{round(float(v), digits) + 0.0:g}" for v in values) + "]"  # + 0.0: no "-0"


def gb(n: float) -> str:
    """Bytes as decimal gigabytes (the paper's unit), 2 decimals."""
    return f"{n / 1e9:.2f} GB"
