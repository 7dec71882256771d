"""A keyed work queue in the style of client-go's: each run is reconciled by one worker at a time.

Watch events only *enqueue* a run's key; duplicates collapse while the key waits, and a key that
is re-added while being processed is processed once more afterwards. So a burst of Job and Pod
events costs one or two passes, never two concurrent passes over the same run.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
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
    """Keys wait in two lanes: urgent ones (a stage's Job finished: a transition) are taken before
    the others (a Pod changed, the run's own status write came back, a progress poll, a resync).

    Why: under load every moving run has a key waiting, and a transition waited its turn behind
    all of them (issue 14: at 10 transitions/s, 8 s in the queue on average, while most passes had
    nothing to do). Taken first, a transition waits only for other transitions; the other passes
    (progress, a Pod seen running) come later, when the workers have room. A key waiting in the
    normal lane that becomes urgent moves to the urgent lane (it is still passed once).
    """

    def __init__(
        self,
        process: Callable[[Key], Awaitable[None]],
        workers: int = 4,
        backoff: Backoff | None = None,
        waited: Callable[[str, float], None] | None = None,
    ) -> None:
        """``waited`` is told, for each pass, its lane ("urgent", "normal") and how long its key
        waited in the queue for a worker."""
        self._process = process
        self._waited = waited
        self._added_at: dict[Key, float] = {}
        # One token per key waiting (in either lane); the lanes may hold stale entries of keys that
        # moved to the urgent lane or were taken already: skipped when met (_next).
        self._ready: asyncio.Queue[None] = asyncio.Queue()
        self._urgent: collections.deque[Key] = collections.deque()
        self._normal: collections.deque[Key] = collections.deque()
        self._queued: dict[Key, bool] = {}  # waiting key -> urgent
        self._processing: set[Key] = set()
        self._dirty: dict[Key, bool] = {}  # re-added while being processed -> urgent
        self._workers = workers
        self.backoff = backoff or Backoff()
        self._tasks: list[asyncio.Task[None]] = []
        self._timers: dict[Key, asyncio.TimerHandle] = {}

    def add(self, key: Key, delay: float = 0.0, urgent: bool = False) -> None:
        """Queue a pass over ``key``: after ``delay`` seconds (a delayed pass is never urgent), and
        before the normal lane when ``urgent``."""
        if delay > 0:
            loop = asyncio.get_running_loop()
            pending = self._timers.get(key)
            if pending is not None and pending.when() <= loop.time() + delay:
                return  # an earlier pass is already due
            if pending is not None:
                pending.cancel()
            self._timers[key] = loop.call_later(delay, self._fire, key)
            return
        now = time.monotonic()
        if key in self._processing:
            if urgent and not self._dirty.get(key, False):
                self._added_at[key] = now  # an urgent wait counts from when it became urgent
            self._dirty[key] = self._dirty.get(key, False) or urgent
            self._added_at.setdefault(key, now)  # its wait starts now, not when re-queued
        elif key not in self._queued:
            self._queued[key] = urgent
            self._added_at.setdefault(key, now)
            (self._urgent if urgent else self._normal).append(key)
            self._ready.put_nowait(None)
        elif urgent and not self._queued[key]:
            self._queued[key] = True  # moves up; its normal-lane entry is now stale
            self._added_at[key] = now
            self._urgent.append(key)

    def cancel_delayed(self, key: Key) -> bool:
        """Drop ``key``'s delayed pass, if one is pending; returns whether one was.

        Why: a running stage's pass asks for a progress poll ten seconds on, and under load the stage
        has ended long before (issue 14: 1-second Pods): the poll was a pass with nothing to do,
        one per stage seen running. A pass that needs no poll says so, and the pending one goes."""
        timer = self._timers.pop(key, None)
        if timer is None:
            return False
        timer.cancel()
        return True

    def waiting(self) -> tuple[int, int]:
        """Keys waiting: (urgent, normal)."""
        urgent = sum(1 for u in self._queued.values() if u)
        return urgent, len(self._queued) - urgent

    def _next(self) -> Key:
        """The next key to pass (a token was taken: one is waiting)."""
        while self._urgent:
            key = self._urgent.popleft()
            if self._queued.get(key) is True:
                return key
        while True:
            key = self._normal.popleft()
            if self._queued.get(key) is False:
                return key

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
            await self._ready.get()
            key = self._next()
            lane = "urgent" if self._queued.pop(key) else "normal"
            added = self._added_at.pop(key, None)
            if self._waited is not None and added is not None:
                self._waited(lane, time.monotonic() - added)
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
                    self.add(key, urgent=self._dirty.pop(key))
