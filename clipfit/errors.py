"""Errors that reach the user as one line and a documented exit status.

Exit statuses (also in README and `clipfit --help`):
  0 success, 1 unexpected internal error, 2 usage error (bad flag, unknown model,
  invalid config), 3 data error (unreadable folder, no pairs, bad item with --strict),
  4 model or weights could not be loaded (or a hub dataset: no network), 5 training failed
  (non-finite loss) or a model's embeddings are non-finite,
  6 regression gate failed (--fail-on-zeroshot-drop), 7 output folder unwritable or disk
  too small, 130 interrupted (checkpoint saved).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_MODEL = 4
EXIT_TRAINING = 5
EXIT_GATE = 6
EXIT_OUTPUT = 7
EXIT_INTERRUPTED = 130


class ClipfitError(Exception):
    """An expected failure with a one-line message for the user."""

    exit_code = EXIT_INTERNAL


class UsageError(ClipfitError):
    exit_code = EXIT_USAGE


class DataError(ClipfitError):
    exit_code = EXIT_DATA


class ModelError(ClipfitError):
    exit_code = EXIT_MODEL


class NetworkError(ClipfitError):
    """A hub dataset could not be reached (same status as a hub model that cannot be loaded)."""

    exit_code = EXIT_MODEL


class TrainingError(ClipfitError):
    exit_code = EXIT_TRAINING


class GateFailed(ClipfitError):
    exit_code = EXIT_GATE


class OutputError(ClipfitError):
    exit_code = EXIT_OUTPUT


class Interrupted(ClipfitError):
    exit_code = EXIT_INTERRUPTED


def message_of(error: ClipfitError) -> str:
    """The error's own one-line message. A DataLoader re-raises an error from a worker process
    with the worker's traceback as its message; the original message is that traceback's last line."""
    text = str(error)
    if "\nOriginal Traceback" in text:
        last = text.strip().splitlines()[-1]  # "clipfit.errors.DataError: <message>"
        text = last.split(": ", 1)[1] if ": " in last else last
    return text
