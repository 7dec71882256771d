"""A stage's progress and ETA, the run's one-line progress summary (``2/4 ppo 40%``), and when to
read a running stage's log for live progress. Pure: no client calls (the clock is injectable)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from rlhf_api.run import RLHFRunStatus, StageProgress, StageStatus
from rlhf_api.timestamps import parse_timestamp

from .observe import JobObservation, Progress

DEFAULT_PROGRESS_INTERVAL = 10.0  # seconds between log reads of one running stage pod


def merge_progress(st: StageStatus, job: JobObservation, now: str) -> StageProgress | None:
    """Newest step from the pod's progress annotation or the last termination message.

    The ETA is recomputed only when the step moves: recomputing it on every pass would change the
    status each time and turn every reconcile into a status write.
    """
    step, total = None, None
    if job.progress is not None:
        step, total = job.progress.step, job.progress.total_steps
    elif job.result is not None and job.result.stage:
        step, total = job.result.step, job.result.total_steps
    if job.complete and total:
        step = total
    old = st.progress
    if step is None:
        return old
    total = total or (old.total_steps if old else None)
    if old is not None and old.step == step and old.total_steps == total:
        return old
    percent = min(100, int(100 * step / total)) if total else None
    eta = None
    start, at = parse_timestamp(st.start_time or job.start_time), parse_timestamp(now)
    if total and step and start and at and step < total:
        elapsed = max(0.0, (at - start).total_seconds())
        eta = int(elapsed * (total - step) / step)
    elif total and step >= total:
        eta = 0
    return StageProgress(step=step, total_steps=total, percent=percent, eta_seconds=eta)


def summary(done: int, todo: int, current: StageStatus | None) -> str:
    """``done/todo stage percent%``: stages finished out of stages to run, then the current one."""
    text = f"{done}/{todo}"
    if current is not None and current.phase not in ("Succeeded", "Skipped"):
        text += f" {current.name}"
        if current.progress is not None and current.progress.percent is not None:
            text += f" {current.progress.percent}%"
    return text[:64]


@dataclass
class _Read:
    at: float
    progress: Progress | None


class LogReads:
    """Which running pods' logs to read now for live progress, and what the last reads found.

    At most one read per pod per ``interval`` (0 or less: never): between reads, and after a read
    that failed or found no progress line, the last progress found stands in, so an event-driven
    pass neither costs a log read nor loses progress. Keyed by run, then pod name; a run's pods
    that are no longer running are forgotten at its next pass. Thread-safe (one worker per run,
    several runs at once).
    """

    def __init__(self, interval: float = DEFAULT_PROGRESS_INTERVAL, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self._clock = clock
        self._runs: dict[tuple[str, str], dict[str, _Read]] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    def due(self, run: tuple[str, str], pods: Iterable[str]) -> list[str]:
        """The pods (of those whose log can be read now) to read in this pass; forgets the others."""
        if not self.enabled:
            return []
        now = self._clock()
        pods = list(pods)
        with self._lock:
            known = {p: r for p, r in self._runs.get(run, {}).items() if p in pods}
            if known:
                self._runs[run] = known
            else:
                self._runs.pop(run, None)
        return [p for p in pods if p not in known or now - known[p].at >= self.interval]

    def record(self, run: tuple[str, str], pod: str, progress: Progress | None) -> None:
        """A read happened now; ``progress`` None (failed, or no progress line) keeps the older one."""
        now = self._clock()
        with self._lock:
            entries = self._runs.setdefault(run, {})
            old = entries.get(pod)
            entries[pod] = _Read(now, progress if progress is not None else (old.progress if old else None))

    def progress(self, run: tuple[str, str]) -> dict[str, Progress]:
        """The newest progress read from each of the run's running pods, by pod name."""
        with self._lock:
            return {p: r.progress for p, r in self._runs.get(run, {}).items() if r.progress is not None}

    def next_read_in(self, run: tuple[str, str]) -> float | None:
        """Seconds until one of the run's pods is due for its next read; None when it has none."""
        with self._lock:
            reads = list(self._runs.get(run, {}).values())
        if not reads or not self.enabled:
            return None
        now = self._clock()
        return max(0.0, min(r.at + self.interval - now for r in reads))

    def forget(self, run: tuple[str, str]) -> None:
        with self._lock:
            self._runs.pop(run, None)


def poll_after(status: RLHFRunStatus, next_read_in: float | None, minimum: float = 1.0) -> float | None:
    """When to reconcile the run again without a watch event, so that its live progress moves.

    Only while a stage of an unfinished run is Running and one of its pods' logs is being read
    (``next_read_in`` from :meth:`LogReads.next_read_in`); otherwise None: a finished, suspended or
    pending run is woken by watch events and the resync alone. Never sooner than ``minimum``.
    """
    if next_read_in is None or status.phase in ("Succeeded", "Failed"):
        return None
    if not any(s.phase == "Running" for s in status.stages):
        return None
    return max(minimum, next_read_in)
