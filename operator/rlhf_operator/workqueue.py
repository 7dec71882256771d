"""A keyed work queue in the style of client-go's: each run is reconciled by one worker at a time.

Watch events only *enqueue* a run's key; duplicates collapse while the key waits, and a key that
is re-added while being processed is processed once more afterwards. So a burst of Job and Pod
events costs one or two passes, never two concurrent passes over the same run.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)
Key = tuple[str, str]  # (namespace, name)


class Backoff:
    """Per-key exponential backoff with a cap and jitter, reset by a success.

    Why: a reconcile that keeps failing (an API server that refuses, a webhook that is down) used to
    be retried every 2 s for ever, by every worker, for every run at once. Doubling spreads the
    load out, the cap keeps a recovered API server from waiting long, and the jitter keeps a
    thousand runs that failed together from retrying together.
    """

    def __init__(self, base: float = 1.0, cap: float = 300.0, jitter: float = 0.2, rng: random.Random | None = None):
        self.base = base
        self.cap = cap
        self.jitter = jitter
        self._failures: dict[Key, int] = {}
        self._rng = rng or random.Random()

    def failed(self, key: Key) -> float:
        """Record a failure; the delay before the next try (at most cap)."""
        count = self._failures.get(key, 0) + 1
        self._failures[key] = count
        delay = min(self.cap, self.base * 2 ** min(count - 1, 30))
        return delay * (1 - self.jitter * self._rng.random())

    def succeeded(self, key: Key) -> None:
        self._failures.pop(key, None)

    def failures(self, key: Key) -> int:
        return self._failures.get(key, 0)


class WorkQueue:
    def __init__(
        self, process: Callable[[Key], Awaitable[None]], workers: int = 4, backoff: Backoff | None = None
    ) -> None:
        self._process = process
        self._queue: asyncio.Queue[Key] = asyncio.Queue()
        self._queued: set[Key] = set()
        self._processing: set[Key] = set()
        self._dirty: set[Key] = set()
        self._workers = workers
        self.backoff = backoff or Backoff()
        self._tasks: list[asyncio.Task[None]] = []
        self._timers: dict[Key, asyncio.TimerHandle] = {}

    def add(self, key: Key, delay: float = 0.0) -> None:
        if delay > 0:
            loop = asyncio.get_running_loop()
            pending = self._timers.get(key)
            if pending is not None and pending.when() <= loop.time() + delay:
                return  # an earlier pass is already due
            if pending is not None:
                pending.cancel()
            self._timers[key] = loop.call_later(delay, self._fire, key)
            return
        if key in self._processing:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    def _fire(self, key: Key) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(), name=f"reconcile-worker-{i}") for i in range(self._workers)]

    async def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _work(self) -> None:
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            self._processing.add(key)
            try:
                await self._process(key)
                self.backoff.succeeded(key)
            except asyncio.CancelledError:
                raise
            except Exception:
                delay = self.backoff.failed(key)
                attempt = self.backoff.failures(key)
                log.exception("reconcile of %s/%s failed (%d in a row); retrying in %.1fs", *key, attempt, delay)
                self.add(key, delay)
            finally:
                self._processing.discard(key)
                if key in self._dirty:
                    self._dirty.discard(key)
                    self.add(key)
