"""Progress on stderr: a bar on a terminal, plain timestamped lines in a log (CI), or nothing (--progress)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

LINE_EVERY_SECONDS = 15.0
LINE_EVERY_FRACTION = 0.1
LINE_MIN_SECONDS = 1.0  # two 10% lines of a short task come at least this far apart


def progress_reporter(mode: str = "auto", quiet: bool = False) -> Progress | LineProgress:
    """What reports progress for `mode`: auto is a bar on a terminal and lines otherwise; quiet or none, nothing."""
    console = Console(stderr=True)
    if mode == "auto":
        mode = "bar" if console.is_terminal else "lines"
    if mode == "lines" and not quiet:
        return LineProgress()
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True, disable=quiet or mode != "bar",
    )


@dataclass
class _Task:
    description: str
    total: float | None
    started: float
    done: float = 0.0
    reported_at: float = 0.0
    reported_fraction: float = 0.0


class LineProgress:
    """Timestamped lines on stderr: when a task starts, at each further 10% or every 15 s, and when it ends.

    Has the part of rich's Progress that scrub uses (a context manager, add_task, advance).
    """

    def __init__(self) -> None:
        self._tasks: list[_Task] = []

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = None) -> int:
        """Start a task (a line saying so); its id for advance."""
        now = time.monotonic()
        self._tasks.append(_Task(description, total, now, reported_at=now))
        self._line(self._tasks[-1], "started")
        return len(self._tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        """Count `advance` more steps done; a line when one is due."""
        task, now = self._tasks[task_id], time.monotonic()
        task.done += advance
        fraction = task.done / task.total if task.total else 0.0
        finished = task.total is not None and task.done >= task.total
        next_step = fraction - task.reported_fraction >= LINE_EVERY_FRACTION and now - task.reported_at >= LINE_MIN_SECONDS
        if finished or next_step or now - task.reported_at >= LINE_EVERY_SECONDS:
            task.reported_at, task.reported_fraction = now, fraction
            self._line(task, "done" if finished else f"{fraction:.0%}" if task.total else "")

    def _line(self, task: _Task, state: str) -> None:
        count = f"{task.done:g}" + (f"/{task.total:g}" if task.total else "")
        elapsed = time.monotonic() - task.started
        stamp = time.strftime("%H:%M:%S")
        click.echo(f"{stamp} scrub: {task.description}: {count} {state} ({elapsed:.0f} s)".replace("  ", " "), err=True)
