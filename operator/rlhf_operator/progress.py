"""A stage's progress and ETA, and the run's one-line progress summary (``2/4 ppo 40%``). Pure."""

from __future__ import annotations

from datetime import UTC, datetime

from .api.run import StageProgress, StageStatus
from .observe import JobObservation


def _parse(ts: str | None) -> datetime | None:
    if not ts:
        return None
    try:
        return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


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
    start, at = _parse(st.start_time or job.start_time), _parse(now)
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
