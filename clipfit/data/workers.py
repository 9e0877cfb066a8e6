"""DataLoader worker processes: started for one piece of work, ended when it is done.

Workers ignore SIGINT and SIGTERM (`ignore_stop_signals`): the main process decides what a
signal means (finish the step, checkpoint, stop). The flip side is that nothing may rely on a
signal to end them. Python's multiprocessing ends leftover daemonic children at exit with
SIGTERM and then joins them without a timeout, so one live worker would hang a finished run
forever. Hence every loader is a `Loader`, closed explicitly when its work is done and on every
exit path (`with loader:` or `close()`), and `end_workers()` kills any worker still alive when
the command ends. A worker whose parent dies is killed with it at once on Linux (a parent-death
signal, `die_with_parent`, for forked workers); elsewhere it exits by itself within seconds
(torch's worker loop checks its parent's pid). Workers never hold the run folder's lock (clipfit.rundir closes it in
every forked child).
"""

from __future__ import annotations

import ctypes
import functools
import multiprocessing
import os
import signal
import sys
import weakref
from typing import Callable

from torch.utils.data import DataLoader

PR_SET_PDEATHSIG = 1  # <sys/prctl.h>


def ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C and SIGTERM to the main process, which finishes the step and
    checkpoints; a worker killed by a signal sent to the whole process group would crash the run."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG), so a killed run
    leaves no worker behind; if the parent died before this call, exit now. Elsewhere, nothing."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return  # not allowed here (a sandbox): torch's own parent check remains
    if os.getppid() != parent:
        os._exit(0)


def start_worker(parent: int | None, init: Callable[[int], None] | None, worker_id: int) -> None:
    """Every worker's first act: tie its life to the parent's (`parent`: None where the worker was
    not forked by it), then the loader's own init."""
    if parent is not None:
        die_with_parent(parent)
    if init is not None:
        init(worker_id)


def forked(context) -> bool:
    """Whether workers started with `context` (a DataLoader's multiprocessing_context: None, a
    name or a context) are forked by this process. Under forkserver (Python 3.14's default on
    Linux) their parent is the server, whose death, not ours, a parent-death signal would follow."""
    method = context if isinstance(context, str) else context.get_start_method() if context else None
    return (method or multiprocessing.get_start_method()) == "fork"


class Loader(DataLoader):
    """A DataLoader whose workers die with the process that started them, and that remembers the
    iterators it hands out, so `close()` can end their worker processes however the iteration
    ended (finished, broken off, or an exception)."""

    def __init__(self, *args, worker_init_fn: Callable[[int], None] | None = None, **kwargs):
        parent = os.getpid() if forked(kwargs.get("multiprocessing_context")) else None
        super().__init__(*args, worker_init_fn=functools.partial(start_worker, parent, worker_init_fn), **kwargs)
        self.iterators: list = []

    def __iter__(self):
        iterator = super().__iter__()
        if iterator not in self.iterators:  # a persistent-worker loader hands out the same one again
            self.iterators.append(iterator)
            if hasattr(iterator, "_workers"):
                STARTED.add(iterator)
        return iterator

    def close(self) -> None:
        for iterator in self.iterators:
            shut_down(iterator)
        self.iterators.clear()
        if self.persistent_workers:
            self._iterator = None  # a later iteration starts fresh workers

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


STARTED: "weakref.WeakSet" = weakref.WeakSet()  # iterators with worker processes (a freed one ended them)


def shut_down(iterator) -> None:
    """End an iterator's workers: torch's own shutdown (it asks them to stop and waits a little),
    then SIGKILL for any that did not stop; torch forgets their pids first, so their death is
    not reported as a crashed worker."""
    stop = getattr(iterator, "_shutdown_workers", None)  # absent without workers
    if stop is None:
        return
    stop()
    for process in getattr(iterator, "_workers", []):
        if process.is_alive():
            process.kill()
            process.join(5.0)
    STARTED.discard(iterator)


def worker_processes() -> list:
    """Worker processes of this process's loaders that are still alive."""
    return [p for iterator in list(STARTED) for p in getattr(iterator, "_workers", []) if p.is_alive()]


def end_workers() -> int:
    """End every worker still running (they ignore SIGTERM); how many there were. Called when a
    command ends, before multiprocessing's exit handler would wait for them forever."""
    alive = len(worker_processes())
    for iterator in list(STARTED):
        shut_down(iterator)
    return alive
