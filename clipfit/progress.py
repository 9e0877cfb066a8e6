"""How a run shows itself: a rich bar on a terminal, plain lines in logs and CI, or nothing."""

from __future__ import annotations

import sys
import time
from typing import Any

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

    def step(self, row: dict[str, Any], total: int) -> None:
        pass


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
            print(f"[{row['step']}/{total}] {format_row(row)}", file=self.stream, flush=True)


class RichProgress(Progress):
    """A live bar with loss, lr, pairs/s and ETA."""

    def __init__(self, stream=None):
        super().__init__(stream)
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

        self.console = Console(file=self.stream)
        self.bar = Bar(TextColumn("[bold]refine"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       TextColumn("{task.fields[status]}"), console=self.console)
        self.task = None

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def info(self, message: str) -> None:
        self.console.print(rich_literal(message), highlight=False)

    def warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/] {rich_literal(message)}", highlight=False)

    def step(self, row: dict[str, Any], total: int) -> None:
        if self.task is None:
            self.task = self.bar.add_task("refine", total=total, status="")
        self.bar.update(self.task, completed=row["step"], status=format_row(row))


def make_progress(quiet: bool, stream=None) -> Progress:
    stream = stream or sys.stderr
    if quiet:
        return Progress(stream)
    if stream.isatty():
        return RichProgress(stream)
    return PlainProgress(stream)
