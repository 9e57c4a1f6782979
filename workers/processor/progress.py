"""Progress of a processor run: records, lag, rate, ETA.

A rich bar on a terminal, a log line every few seconds otherwise, and Dagster Pipes log messages
when the process runs under Pipes (the caller passes the pipes context's ``log``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Rate:
    """Records per second over a sliding ~10 s horizon (an EMA of per-update rates)."""

    value: float = 0.0
    last_count: int = 0
    last_time: float = field(default_factory=time.monotonic)

    def update(self, count: int) -> float:
        now = time.monotonic()
        elapsed = now - self.last_time
        if elapsed >= 0.5:
            current = (count - self.last_count) / elapsed
            weight = min(1.0, elapsed / 10)
            self.value = current if self.value == 0 else self.value + weight * (current - self.value)
            self.last_count, self.last_time = count, now
        return self.value


def describe(records: int, lag: int | None, rate: float, late: int) -> str:
    eta = f"{lag / rate:.0f}s" if lag and rate > 0 else "-"
    lag_text = "?" if lag is None else f"{lag:,}"
    return f"records={records:,} lag={lag_text} rate={rate:,.0f}/s eta={eta} late={late:,}"


class Progress:
    """Base: log a line every ``interval`` seconds through ``emit``."""

    def __init__(self, emit: Callable[[str], None] | None = None, interval: float = 5.0, label: str = "") -> None:
        self.emit = emit or (lambda line: print(line, file=sys.stderr, flush=True))
        self.interval, self.label = interval, label
        self.rate = Rate()
        self.last_emit = 0.0

    def update(self, records: int, lag: int | None, late: int = 0, force: bool = False) -> None:
        rate = self.rate.update(records)
        now = time.monotonic()
        if force or now - self.last_emit >= self.interval:
            self.last_emit = now
            self.emit(f"{self.label} {describe(records, lag, rate, late)}".strip())

    def close(self) -> None:
        """Nothing to release for log lines."""


class RichProgress(Progress):
    """A live bar (completed = records processed, total = processed + lag) on a TTY."""

    def __init__(self, label: str = "") -> None:
        super().__init__(interval=0.2, label=label)
        from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar

        self.bar = Bar(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            transient=False,
        )
        self.task = self.bar.add_task(label, total=None, info="")
        self.bar.start()

    def update(self, records: int, lag: int | None, late: int = 0, force: bool = False) -> None:
        rate = self.rate.update(records)
        total = None if lag is None else records + lag
        self.bar.update(self.task, completed=records, total=total, info=describe(records, lag, rate, late))

    def close(self) -> None:
        self.bar.stop()


class NoProgress(Progress):
    def update(self, records: int, lag: int | None, late: int = 0, force: bool = False) -> None:
        """Silent."""


def make_progress(kind: str, label: str, pipes_log: Callable[[str], None] | None = None) -> Progress:
    """``auto``: pipes log if given, rich on a TTY, log lines otherwise; or ``rich``/``log``/``none``."""
    if kind == "none":
        return NoProgress()
    if pipes_log is not None and kind == "auto":
        return Progress(emit=pipes_log, interval=10.0, label=label)
    if kind == "rich" or (kind == "auto" and sys.stderr.isatty()):
        return RichProgress(label)
    return Progress(label=label)
