"""A background thread that assembles and transfers the next batches while the device computes."""

import queue
import threading
from typing import Callable, Iterator

import jax


def _on_device(leaf):
    """A host array moved to the default device; a jax.Array (possibly spanning processes) as is."""
    return leaf if isinstance(leaf, jax.Array) else jax.device_put(leaf)


class Prefetcher:
    """Iterates device batches make_batch(step) for step in [start, stop), `depth` steps ahead.

    Use as a context manager; an exception in the worker is raised in the consumer.
    """

    _END = object()

    def __init__(self, make_batch: Callable[[int], dict], start: int, stop: int, depth: int = 2):
        self._make = make_batch
        self._steps = range(start, stop)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, daemon=True)

    def _work(self) -> None:
        try:
            for step in self._steps:
                item = jax.tree.map(_on_device, self._make(step))
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as err:  # handed to the consumer, which re-raises it
            self._queue.put(err)
        self._queue.put(self._END)

    def __enter__(self) -> Iterator[dict]:
        self._thread.start()
        return self

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        item = self._queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def __exit__(self, *exc) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.1)
