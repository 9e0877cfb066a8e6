"""How a run shows itself: a rich bar on a terminal, plain lines in logs and CI, or nothing.

Besides training, every long phase (checking images, precomputing frozen rows, building feature
banks, encoding for evaluation) shows a bar with an ETA: code that loops calls `phase(label,
total)` and advances it, and the command's Progress (made active by `activate`) draws it.
Without an active Progress, or with --quiet/--json, a phase shows nothing.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

TERM_ORDER = ("loss",)


def printable(text: object) -> str:
    """`text` on one line, as typed: control characters, line breaks and undecodable file-name
    bytes become escapes (\\n, \\x1b, \\u2028, \\xe9), so a path can neither break a message
    into lines nor drive the terminal, and printing it never fails."""
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in str(text))


def _escape(ch: str) -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a file-name byte that is not UTF-8 (Python's surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return ch.encode("unicode_escape", "backslashreplace").decode("ascii")


def rich_literal(text: object) -> str:
    """`text` printed by rich as it is: '[bold]' in a file name is not markup."""
    from rich.markup import escape

    return escape(printable(text))


def format_row(row: dict[str, Any]) -> str:
    parts = [f"step {row['step']}"]
    for key, value in row.items():
        if key in ("step", "epoch", "lr", "pairs_per_s") or not isinstance(value, float):
            continue
        parts.append(f"{key} {value:.4f}")
    parts.append(f"lr {row['lr']:.2e}")
    parts.append(f"{row['pairs_per_s']:.1f} pairs/s")
    return "  ".join(parts)


class Progress:
    """Interface used by the loop and the recipe; this base class prints nothing but warnings."""

    def __init__(self, stream=None, silent: bool = False):
        self.stream = stream or sys.stderr
        self.silent = silent  # distributed ranks other than 0: rank 0 speaks for the run

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def info(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        if not self.silent:
            print(f"warning: {printable(message)}", file=self.stream, flush=True)

    epochs, per_epoch = 0, 0  # set by `plan`; 0: unknown

    def plan(self, epochs: int, per_epoch: int) -> None:
        """How training divides into epochs, for the per-epoch bar and lines."""
        self.epochs, self.per_epoch = epochs, per_epoch

    def epoch_label(self, row: dict[str, Any]) -> str:
        return f"epoch {row['epoch'] + 1}" + (f"/{self.epochs}" if self.epochs else "")

    def step(self, row: dict[str, Any], total: int) -> None:
        pass

    @contextmanager
    def phase(self, label: str, total: int) -> Iterator["Phase"]:
        yield Phase(label, total)


class Phase:
    """Progress through one phase of `total` items; this base class only counts."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.done, self.started = label, total, 0, time.monotonic()

    def advance(self, count: int = 1) -> None:
        self.done += count

    def eta(self) -> float | None:
        elapsed = time.monotonic() - self.started
        return elapsed / self.done * (self.total - self.done) if self.done else None


class PlainPhase(Phase):
    """A line every `every` seconds with the ETA, and one at the end if the phase took long."""

    def __init__(self, label: str, total: int, stream, every: float):
        super().__init__(label, total)
        self.stream, self.every, self.last = stream, every, self.started

    def advance(self, count: int = 1) -> None:
        super().advance(count)
        now = time.monotonic()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            print(f"{self.label}: {self.done}/{self.total}, about {format_seconds(self.eta())} left",
                  file=self.stream, flush=True)

    def close(self) -> None:
        elapsed = time.monotonic() - self.started
        if elapsed >= self.every:
            print(f"{self.label}: {self.done}/{self.total} in {format_seconds(elapsed)}", file=self.stream, flush=True)


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class PlainProgress(Progress):
    """Periodic log lines for non-terminals (CI logs, pipes)."""

    def __init__(self, stream=None, every_seconds: float = 10.0):
        super().__init__(stream)
        self.every, self.last = every_seconds, 0.0

    def info(self, message: str) -> None:
        print(printable(message), file=self.stream, flush=True)

    def step(self, row: dict[str, Any], total: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.every or row["step"] in (1, total):
            self.last = now
            print(f"[{row['step']}/{total}] {self.epoch_label(row)}  {format_row(row)}", file=self.stream, flush=True)

    @contextmanager
    def phase(self, label: str, total: int) -> Iterator[Phase]:
        shown = PlainPhase(label, total, self.stream, self.every)
        yield shown
        shown.close()


class RichProgress(Progress):
    """A live bar with loss, lr, pairs/s and ETA."""

    def __init__(self, stream=None):
        super().__init__(stream)
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

        from rich.table import Column

        self.console = Console(file=self.stream)
        # fixed widths for the bar, counts and ETA; the loss line takes what is left and is cut first
        self.bar = Bar(TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True)),
                       BarColumn(bar_width=24), MofNCompleteColumn(table_column=Column(no_wrap=True)),
                       TimeRemainingColumn(table_column=Column(no_wrap=True)),
                       TextColumn("{task.fields[status]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
                       console=self.console, expand=True)
        self.task = self.epoch_task = self.shown_epoch = None
        self.live = 0  # open users of the live display: training and phases, possibly nested

    def __enter__(self):
        self.start_live()
        return self

    def __exit__(self, *exc):
        self.stop_live()
        return False

    def start_live(self) -> None:
        if self.live == 0:
            self.bar.start()
        self.live += 1

    def stop_live(self) -> None:
        self.live -= 1
        if self.live == 0:
            self.bar.stop()

    @contextmanager
    def phase(self, label: str, total: int) -> Iterator[Phase]:
        shown = RichPhase(label, total, self.bar)
        self.start_live()
        try:
            yield shown
        finally:
            self.bar.remove_task(shown.task)
            self.stop_live()

    def info(self, message: str) -> None:
        self.console.print(rich_literal(message), highlight=False)

    def warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/] {rich_literal(message)}", highlight=False)

    def step(self, row: dict[str, Any], total: int) -> None:
        """Two bars: the whole run (with the loss line) and, when `plan` was told, this epoch."""
        if self.task is None:
            self.task = self.bar.add_task("refine", total=total, status="")
        self.bar.update(self.task, completed=row["step"], status=format_row(row))
        if self.per_epoch:
            done = row["step"] - row["epoch"] * self.per_epoch
            if self.epoch_task is None or self.shown_epoch != row["epoch"]:
                if self.epoch_task is not None:  # a new epoch: a new bar, so its ETA starts afresh
                    self.bar.remove_task(self.epoch_task)
                self.epoch_task = self.bar.add_task(self.epoch_label(row), total=self.per_epoch, status="",
                                                    completed=max(0, done - 1))
                self.shown_epoch = row["epoch"]
            self.bar.update(self.epoch_task, completed=done)


class RichPhase(Phase):
    def __init__(self, label: str, total: int, bar):
        super().__init__(label, total)
        self.bar, self.task = bar, bar.add_task(label, total=total, status="")

    def advance(self, count: int = 1) -> None:
        super().advance(count)
        self.bar.update(self.task, advance=count)


ACTIVE: list[Progress] = [Progress(silent=True)]  # the Progress of the command running in this process


def activate(progress: Progress) -> Progress:
    """Make `progress` the one that draws phases (`phase`, `track`) from here on."""
    ACTIVE[0] = progress
    return progress


def phase(label: str, total: int):
    """A context giving a Phase to advance: `with phase("encoding", n) as p: ... p.advance(k)`."""
    return ACTIVE[0].phase(label, total)


def track(items: Iterable, label: str, total: int, size=len) -> Iterator:
    """Yield `items`, advancing a phase by `size(item)` for each (e.g. a batch's length)."""
    with phase(label, total) as shown:
        for item in items:
            yield item
            shown.advance(size(item))


def make_progress(quiet: bool, stream=None) -> Progress:
    stream = stream or sys.stderr
    if quiet:
        return activate(Progress(stream))
    if stream.isatty():
        return activate(RichProgress(stream))
    return activate(PlainProgress(stream))
