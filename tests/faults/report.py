"""The fault suite's figures: one row per scenario, printed as a table at the end of the run.

Every scenario records its row *before* asserting, so a failing scenario still shows how many
events it lost or counted twice. Timings are measured and printed, never asserted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

#: Multiplies the size of every scenario: CI runs 1, ``make faults`` runs more.
SCALE_ENV = "SESSIONS_FAULTS_SCALE"


def scale() -> float:
    try:
        value = float(os.environ.get(SCALE_ENV, "1"))
    except ValueError:
        raise ValueError(f"{SCALE_ENV} must be a number, got {os.environ[SCALE_ENV]!r}") from None
    if value <= 0:
        raise ValueError(f"{SCALE_ENV} must be > 0, got {value}")
    return value


def scaled(base: int, minimum: int = 1) -> int:
    """``base`` events (or rounds) at scale 1, proportionally more or fewer at other scales."""
    return max(minimum, round(base * scale()))


@dataclass
class Row:
    scenario: str
    #: Events sent (bad ones included where the scenario sends bad input).
    sent: int = 0
    #: Events the database counts (requests), over the scenario's sessions.
    applied: int = 0
    lost: int = 0
    double: int = 0
    #: Dead-letter rows written / messages refused with a logged reason.
    dead_lettered: int = 0
    refused: int = 0
    #: Worst ``SessionTracker.record`` call, in microseconds (``None``: no tracker used).
    worst_record_us: float | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


ROWS: list[Row] = []


def add(row: Row) -> Row:
    ROWS.append(row)
    return row


def table(rows: list[Row] | None = None) -> str:
    rows = ROWS if rows is None else rows
    header = (
        "scenario",
        "sent",
        "applied",
        "lost",
        "double",
        "dead-lettered",
        "refused",
        "worst record()",
        "seconds",
    )
    lines = [
        (
            row.scenario,
            str(row.sent),
            str(row.applied),
            str(row.lost),
            str(row.double),
            str(row.dead_lettered),
            str(row.refused),
            "-" if row.worst_record_us is None else f"{row.worst_record_us:,.0f} us",
            f"{row.seconds:.1f}",
        )
        for row in rows
    ]
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines, strict=False)]

    def render(cells: tuple[str, ...]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        return "| " + " | ".join([first, *rest]) + " |"

    separator = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    output = [f"fault suite at scale {scale():g} ({SCALE_ENV})", render(header), separator]
    output += [render(line) for line in lines]
    notes = [f"  {row.scenario}: {note}" for row in rows for note in row.notes]
    if notes:
        output += ["", "notes:", *notes]
    return "\n".join(output)
