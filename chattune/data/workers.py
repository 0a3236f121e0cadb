"""Forked worker processes that map a function over a stream of items, results in order, a bounded number in flight.

What the workers need (`shared`: the tokenizer, the settings) is passed to them when they are forked, never pickled
per item and never parked in a module global; only the items and the results cross the pipe. A worker that dies
(killed, out of memory) ends the map with an error instead of a hang, and an exception in a worker is raised in
the parent.
"""

from __future__ import annotations

import multiprocessing
import queue
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_DONE = None


def _serve(function: Callable[[Any, Any], Any], shared: Any, tasks: Any, results: Any) -> None:
    while (task := tasks.get()) is not _DONE:
        index, item = task
        try:
            results.put((index, True, function(item, shared)))
        except BaseException as e:  # noqa: BLE001 - handed to the parent, which raises it
            results.put((index, False, e))


def ordered_map(function: Callable[[Any, Any], Any], shared: Any, items: Iterable[Any], processes: int,
                in_flight: int | None = None) -> Iterator[Any]:
    """`function(item, shared)` for every item, in order: in this process when `processes` <= 1, else in that many
    forked workers with at most `in_flight` items (default 2 per worker) given out and not yet collected."""
    if processes <= 1:
        for item in items:
            yield function(item, shared)
        return
    context = multiprocessing.get_context("fork")
    tasks, results = context.Queue(), context.Queue()
    workers = [context.Process(target=_serve, args=(function, shared, tasks, results), daemon=True)
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    limit, sent, done, waiting, finished = in_flight or 2 * processes, 0, 0, {}, False
    try:
        for item in items:
            tasks.put((sent, item))
            sent += 1
            while sent - done >= limit:
                yield _next(results, waiting, done, workers)
                done += 1
        while done < sent:
            yield _next(results, waiting, done, workers)
            done += 1
        finished = True
    finally:
        _stop(workers, tasks, results, finished)


def _stop(workers: list, tasks: Any, results: Any, finished: bool) -> None:
    """Every item done: the workers are told to end. Anything else (an error, Ctrl-C, SIGTERM): they are killed, and
    nothing waits on the queues. The signal may have struck inside `tasks.put` with the queue's lock held, where a
    further put would wait forever; and queue feeder threads with unread items block the interpreter's exit."""
    if finished:
        for _ in workers:
            tasks.put(_DONE)
        for worker in workers:
            worker.join(timeout=5)
    for worker in workers:
        if worker.is_alive():
            worker.kill()
        worker.join(timeout=5)
    if not finished:
        tasks.cancel_join_thread()
        results.cancel_join_thread()


def _next(results: Any, waiting: dict[int, tuple[bool, Any]], index: int, workers: list) -> Any:
    while index not in waiting:
        try:
            got, ok, value = results.get(timeout=1.0)
        except queue.Empty:
            dead = [w for w in workers if not w.is_alive()]
            if dead:
                raise RuntimeError(f"a data worker process died (exit code {dead[0].exitcode}); run again, or with "
                                   "--preprocessing_num_workers 1 to see the error in this process") from None
            continue
        waiting[got] = (ok, value)
    ok, value = waiting.pop(index)
    if not ok:
        raise value
    return value
