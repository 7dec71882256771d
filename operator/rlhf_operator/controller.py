"""The operator's moving parts, wired together: leader election, the work queue, resync, health.

Created by ``__main__`` and handed to the kopf handlers through kopf's memo.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .cache import WatchCache
from .defaults import OperatorDefaults
from .health import Health
from .heap import release_free_memory
from .kube import Cluster
from .leader import LeaseElector
from .metrics import Metrics
from .progress import DEFAULT_PROGRESS_INTERVAL
from .reconcile import Reconciler
from .workqueue import Key, WorkQueue

log = logging.getLogger(__name__)
SETTLED_PHASES = ("Succeeded", "Failed")


def settled(run: dict[str, Any]) -> bool:
    """A finished run whose status already answers its current spec: resync has nothing to do for it.

    Why: resync is the safety net for a missed watch event on a run that still moves. A finished
    run does not move; an edit to its spec bumps metadata.generation (and arrives as a watch event
    anyway), and its Jobs' and Pods' events still enqueue it. Reconciling 1,000 finished runs every
    interval only costs API requests.
    """
    status = run.get("status") or {}
    generation = run.get("metadata", {}).get("generation")
    return status.get("phase") in SETTLED_PHASES and status.get("observedGeneration") == generation


class Controller:
    def __init__(
        self,
        cluster: Cluster,
        cache: WatchCache,
        metrics: Metrics,
        health: Health,
        elector: LeaseElector | None,
        namespaces: list[str] | None = None,
        resync_seconds: float = 30.0,
        workers: int = 4,
        defaults: OperatorDefaults | None = None,
        progress_interval: float = DEFAULT_PROGRESS_INTERVAL,
    ) -> None:
        self.cluster = cluster
        self.cache = cache
        self.metrics = metrics
        self.health = health
        self.elector = elector
        self.namespaces = namespaces or []
        self.resync_seconds = resync_seconds
        self.reconciler = Reconciler(cluster, cache, metrics, defaults=defaults, progress_interval=progress_interval)
        self.queue = WorkQueue(
            self._process,
            workers=workers,
            waited=lambda lane, seconds: metrics.queue_wait.labels(lane).observe(seconds),
        )
        # Why its own pool, one thread per worker: asyncio's default executor grows to
        # min(32, cores + 4) threads, and os.cpu_count() is the node's cores, not the Pod's CPU
        # limit. Every thread that allocates under contention gets its own glibc arena, and an
        # arena keeps what its thread freed: on a 64-core node the passes would spread over 32
        # threads' arenas. The workers bound the passes anyway (one pass per worker at a time).
        self._passes = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pass")
        self._tasks: list[asyncio.Task[None]] = []
        self._resync_task: asyncio.Task[None] | None = None

    async def wait_for_leadership(self) -> None:
        # The heartbeat starts first: a standby replica is alive (liveness) while it waits to lead.
        self._tasks.append(asyncio.create_task(self._heartbeat(), name="heartbeat"))
        self._tasks.append(asyncio.create_task(self._loop_lag(), name="loop-lag"))
        if self.elector is None:  # --no-leader-election: a single replica by construction
            self.health.leading = True
            return
        self.elector.start()
        await self._until_leading(True)

    def start(self) -> None:
        self._act()
        # Not ready yet: /readyz also waits for kopf's watch-streams (cache.tap_watch_streams), which
        # open only after this startup handler has returned.
        self.health.watching = True
        if self.elector is not None:
            self._tasks.append(asyncio.create_task(self._follow_leadership(), name="follow-leadership"))

    async def stop(self) -> None:
        self.health.watching = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._pause()
        if self.elector is not None:
            await asyncio.to_thread(self.elector.stop)

    def _act(self) -> None:
        self._resync_task = asyncio.create_task(self._resync(), name="resync")

    async def _pause(self) -> None:
        if self._resync_task is not None:
            self._resync_task.cancel()
            await asyncio.gather(self._resync_task, return_exceptions=True)
            self._resync_task = None
        await self.queue.stop()

    async def _until_leading(self, leading: bool) -> None:
        assert self.elector is not None
        while self.elector.acting() != leading:
            await asyncio.sleep(0.2)
        self.health.leading = leading

    async def _follow_leadership(self) -> None:
        """Lost the Lease (the API server unreachable past the renew deadline): stop acting, stay up,
        act again once the Lease is back. The process used to exit instead, which turned every API
        server outage longer than the Lease into a restart (and a crash loop while it lasted). kopf's
        watches stay open meanwhile; their events only queue keys, and the resync on taking over
        again enqueues every run that still moves."""
        while True:
            await self._until_leading(False)
            log.warning("not the leader any more: stopped acting until the Lease is back")
            await self._pause()
            await self._until_leading(True)
            log.info("the leader again: acting")
            self._act()

    async def _process(self, key: Key) -> None:
        loop = asyncio.get_running_loop()
        again = await loop.run_in_executor(self._passes, self.reconciler.reconcile, *key)
        if again is not None:  # a stage is running: pass again to read its progress (one timer per run)
            self.queue.add(key, again)
        elif self.queue.cancel_delayed(key):  # nothing to poll any more (nor to retry: this pass succeeded)
            self.metrics.polls_cancelled.inc()

    async def _resync(self) -> None:
        """Start the workers once every watch cache has listed, then, every interval, enqueue every
        run that still moves (level-triggered: a missed event delays a pass, never loses one).

        Why wait: a pass before the Jobs' cache is filled would see a running run without its Jobs.
        The first round is also what adopts the runs found at start (the listing's items are not
        handed to kopf's handlers: cache.py). It reads the cache: no request."""
        await self.cache.synced.wait()
        log.info("watch caches filled (%d objects): reconciling", len(self.cache))
        self.queue.start()
        while True:
            for run in self.cache.runs():
                if settled(run):
                    # Not reconciled, but still counted: the per-phase gauge must not lose the
                    # finished runs a restarted operator found (dashboards count them).
                    meta = run["metadata"]
                    self.metrics.run_phase(meta["namespace"], meta["name"], run["status"]["phase"])
                    continue
                meta = run["metadata"]
                self.queue.add((meta["namespace"], meta["name"]))
            await asyncio.sleep(self.resync_seconds)
            # Every interval, what the passes since the last one freed (the adoption of every run
            # at start among them) goes back to the kernel: heap.py. A few milliseconds, in a thread.
            await asyncio.to_thread(release_free_memory)

    async def _loop_lag(self, every: float = 0.25) -> None:
        """How late the event loop wakes a task (kopf's watch events, the workers' hand-offs all go
        through it): a sleep of ``every`` seconds, measured (issue 14: where a transition waits)."""
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(every)
            self.metrics.loop_lag.observe(max(0.0, loop.time() - start - every))

    async def _heartbeat(self) -> None:
        while True:
            self.health.beat()
            await asyncio.sleep(2)
