"""Worker processes for commands that train several independent models (bench, continual).

Workers are forked from a fork server: a clean process (no thread pools of
the caller's, no CUDA) that imports torch and the package once, so workers
start in a fraction of a second. Each worker should run one thread: the
models are small, and two single-threaded processes use two cores far
better than one process with two threads.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from collections.abc import Sequence


def default_jobs() -> int:
    """The cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def worker_pool(jobs: int, preload: Sequence[str]):
    """A ProcessPoolExecutor of `jobs` workers forked from a fork server that has imported `preload`.
    The server starts at once and loads while the caller goes on."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import forkserver

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(preload))
    forkserver.ensure_running()
    return ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_watch_parent,
                               initargs=(os.getpid(),))


def _watch_parent(parent: int) -> None:
    """In a worker: exit when the process that started the pool is gone (killed, not just interrupted),
    so no worker outlives it."""
    import threading

    def watch():
        while True:
            time.sleep(1.0)
            try:
                os.kill(parent, 0)
            except ProcessLookupError:
                os._exit(3)
            except PermissionError:  # the pid now belongs to someone else's process
                os._exit(3)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM inside the block raises KeyboardInterrupt, so workers are stopped on the way out."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


@contextlib.contextmanager
def torch_threads(n: int):
    """`n` torch threads for the block, then the caller's number back. Runs that must give the same
    numbers in a worker and in the calling process compute on the same number of threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def results_as_completed(pool, function, calls: Sequence[tuple]):
    """Submit function(*args) for every args in `calls`; yield (index in calls, result) as each finishes.
    The pool is shut down when the iteration ends; after an error or an interrupt its workers are ended."""
    from concurrent.futures import as_completed

    finished = False
    try:
        futures = {pool.submit(function, *args): index for index, args in enumerate(calls)}
        for future in as_completed(futures):
            yield futures[future], future.result()
        finished = True
    finally:
        stop_pool(pool, finished)


def stop_pool(pool, finished: bool) -> None:
    """Shut the pool down; after an error or an interrupt, end its workers instead of waiting for them."""
    if not finished:
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()
    pool.shutdown(wait=finished, cancel_futures=True)
