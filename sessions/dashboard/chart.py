"""Geometry of the per-minute charts, drawn by the templates as inline SVG.

No script and no external asset: the server works out every bar, point and tick here (a
pure function, tested on its own) and the template only writes them into ``<svg>``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

#: Size of one chart's drawing, in SVG user units (the page scales it to its width).
WIDTH = 720
HEIGHT = 150
#: Room for the value axis on the left and the time axis below.
LEFT = 44
RIGHT = 8
TOP = 8
BOTTOM = 22


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    #: The bar's tooltip: its minute and value.
    label: str


@dataclass(frozen=True)
class Tick:
    position: float
    label: str


@dataclass(frozen=True)
class Chart:
    """One series over consecutive minutes, ready to draw."""

    kind: Literal["bars", "line"]
    title: str
    bars: tuple[Bar, ...]
    #: The line's points as SVG ``points`` text (empty for a bar chart).
    points: str
    y_ticks: tuple[Tick, ...]
    x_ticks: tuple[Tick, ...]
    total: int
    peak: int
    #: The value of the newest minute.
    last: int
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    right: int = WIDTH - RIGHT
    top: int = TOP
    bottom: int = HEIGHT - BOTTOM


def minutes_between(start: datetime, end: datetime) -> list[datetime]:
    """Every whole minute from ``start`` (rounded down) up to and including ``end``'s."""
    first = start.replace(second=0, microsecond=0)
    last = end.replace(second=0, microsecond=0)
    count = int((last - first) / timedelta(minutes=1)) + 1
    return [first + timedelta(minutes=n) for n in range(max(count, 0))]


def nice_ceiling(value: float) -> int:
    """The smallest 1, 2 or 5 times a power of ten at or above ``value`` (at least 1)."""
    if value <= 1:
        return 1
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if step * power >= value:
            return int(step * power)
    raise AssertionError("unreachable")  # pragma: no cover


def chart(
    title: str,
    kind: Literal["bars", "line"],
    minutes: list[datetime],
    values: Mapping[datetime, int],
) -> Chart:
    """A chart of ``values`` (by minute; missing minutes are 0) over ``minutes``."""
    series = [int(values.get(minute, 0)) for minute in minutes]
    peak = max(series, default=0)
    scale_top = nice_ceiling(peak)
    plot_width = WIDTH - LEFT - RIGHT
    plot_height = HEIGHT - TOP - BOTTOM
    slot = plot_width / max(len(series), 1)
    base = HEIGHT - BOTTOM

    def y_of(value: float) -> float:
        return round(base - plot_height * value / scale_top, 2)

    bars: list[Bar] = []
    points: list[str] = []
    for index, (minute, value) in enumerate(zip(minutes, series, strict=True)):
        label = f"{minute:%H:%M} UTC: {value:,}"
        x = LEFT + index * slot
        if kind == "bars":
            if value:
                bars.append(
                    Bar(
                        x=round(x + slot * 0.1, 2),
                        y=y_of(value),
                        width=round(max(slot * 0.8, 0.5), 2),
                        height=round(base - y_of(value), 2),
                        label=label,
                    )
                )
        else:
            points.append(f"{round(x + slot / 2, 2)},{y_of(value)}")
    y_ticks = tuple(Tick(y_of(v), f"{v:,}") for v in (0, scale_top // 2, scale_top))
    every = max(len(minutes) // 6, 1)
    x_ticks = tuple(
        Tick(round(LEFT + index * slot + slot / 2, 2), f"{minute:%H:%M}")
        for index, minute in enumerate(minutes)
        if index % every == 0
    )
    return Chart(
        kind=kind,
        title=title,
        bars=tuple(bars),
        points=" ".join(points),
        y_ticks=_distinct(y_ticks),
        x_ticks=x_ticks,
        total=sum(series),
        peak=peak,
        last=series[-1] if series else 0,
    )


def _distinct(ticks: tuple[Tick, ...]) -> tuple[Tick, ...]:
    """Ticks without repeated labels (a scale of 1 has no useful middle tick)."""
    seen: dict[str, Tick] = {}
    for tick in ticks:
        seen.setdefault(tick.label, tick)
    return tuple(seen.values())
