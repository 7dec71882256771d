"""The record of a stage's starts on the volume, and the bound on interruptions.

Kubernetes does not count an evicted or preempted Pod against the Job's ``backoffLimit`` (the
podFailurePolicy ignores Pods with the ``DisruptionTarget`` condition), so without a bound a stage
on a cluster that keeps preempting it would start again for ever. The stage therefore keeps
``<run>/<stage>.attempts.json``: one entry per start (number, Pod, start and end time, exit code)
and the number of interrupted attempts. An attempt counts as interrupted when it ended with exit
143 (SIGTERM: eviction, preemption, node drain, a deleted Pod, the run's or Kueue's suspend) or
left no end at all (SIGKILL after the grace period, an OOM kill, a lost node). Crashes (exit 1),
which the Job counts against ``backoffLimit``, are not counted again. When a start follows more than
``spec.runtime.maxInterruptions`` interrupted attempts, the stage exits 2 (never retried).

The count starts again for a new run (another uid: a run re-created with the same name), for other
settings or inputs (another config hash), and after an attempt that exited 2 or 3: those fail the
Job, so the next start belongs to a new Job (a retry of the run).

Written only by the process the Pod started (not by the ranks of a multi-process stage), atomically.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from rlhf_api import layout
from rlhf_api.names import RETRY_ANNOTATION
from rlhf_api.timestamps import format_timestamp as _now  # now, as an RFC 3339 timestamp
from rlhf_stages.runtime.atomic import write_json_atomic
from rlhf_stages.runtime.context import EXIT_INTERRUPTED, StageConfigError, StageContext

RECORD_SUFFIX = ".attempts.json"
KEEP = 50  # entries kept in the record (the counters cover all starts)
ENDS_THE_JOB = frozenset(layout.NON_RETRYABLE_EXIT_CODES)


class TooManyInterruptions(StageConfigError):
    """More interrupted attempts than ``spec.runtime.maxInterruptions``: exit 2, never retried."""


def record_path(ctx: StageContext) -> Path:
    return ctx.run_dir / f"{ctx.stage}{RECORD_SUFFIX}"


def read(ctx: StageContext) -> dict[str, Any] | None:
    try:
        record = json.loads(record_path(ctx).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("attempts"), list) else None


def _fresh_reason(record: dict[str, Any] | None, uid: str | None, config_hash: str) -> str | None:
    """Why the count starts again, or None to continue the record."""
    if record is None:
        return "first start"
    if record.get("runUid") != uid:
        return f"a new run (uid {uid}; the record was of uid {record.get('runUid')})"
    if record.get("configHash") != config_hash:
        return "other settings or inputs"
    last = record["attempts"][-1] if record["attempts"] else None
    if last is not None and last.get("exitCode") in ENDS_THE_JOB:
        return f"attempt {last.get('number')} exited {last.get('exitCode')}, which failed its Job; this is a retry"
    return None


def interrupted(entry: dict[str, Any]) -> bool:
    """An attempt stopped from outside: SIGTERM (exit 143), or no recorded end (killed)."""
    return "exitCode" not in entry or entry["exitCode"] == EXIT_INTERRUPTED


def begin(ctx: StageContext, config_hash: str) -> dict[str, Any]:
    """Record this start; raise TooManyInterruptions when it follows too many interrupted attempts."""
    record = read(ctx)
    uid = ctx.invocation.run.uid
    if _fresh_reason(record, uid, config_hash) is not None or record is None:
        record = {
            "stage": ctx.stage,
            "runUid": uid,
            "configHash": config_hash,
            "starts": 0,
            "interruptions": 0,
            "attempts": [],
        }
    elif record["attempts"] and interrupted(record["attempts"][-1]):
        last = record["attempts"][-1]
        last["countedAs"] = "interrupted" if "exitCode" in last else "killed (no recorded end)"
        record["interruptions"] = int(record.get("interruptions", 0)) + 1
    number = int(record.get("starts", 0)) + 1
    entry: dict[str, Any] = {"number": number, "pod": socket.gethostname(), "pid": os.getpid(), "startedAt": _now()}
    record["starts"] = number
    record["attempts"] = [*record["attempts"], entry][-KEEP:]
    limit = ctx.spec.runtime.max_interruptions
    count = int(record["interruptions"])
    if count > limit:
        entry.update(endedAt=_now(), exitCode=TooManyInterruptions.exit_code, refused="too many interruptions")
        write_json_atomic(record_path(ctx), record)
        raise TooManyInterruptions(
            f"{ctx.stage}: this start follows {count} interrupted attempts, more than "
            f"spec.runtime.maxInterruptions ({limit}), so the stage fails instead of starting again for ever. "
            "Interrupted means stopped from outside: evicted, preempted, drained, its Pod deleted, the run "
            "suspended, or killed (e.g. out of memory). Its checkpoints are kept. Find what stops it "
            f"(kubectl get events; kubectl describe pod), then retry the run (annotation {RETRY_ANNOTATION}), "
            "which starts the count again; raise spec.runtime.maxInterruptions if the interruptions are expected "
            f"(record: {ctx.relative(record_path(ctx))})"
        )
    write_json_atomic(record_path(ctx), record)
    return entry


def latest(ctx: StageContext) -> dict[str, Any] | None:
    """The newest start in the record (a launched rank reads the one its parent recorded)."""
    record = read(ctx)
    if record is None or record.get("runUid") != ctx.invocation.run.uid or not record["attempts"]:
        return None
    last: dict[str, Any] = record["attempts"][-1]
    return last


def note(ctx: StageContext, entry: dict[str, Any], notice: str) -> None:
    """Add a notice (a warning for people) to this start's entry, where the manifest and result find it."""
    entry.setdefault("notices", []).append(notice)
    _update(ctx, entry)


def end(ctx: StageContext, entry: dict[str, Any], exit_code: int) -> None:
    entry.update(endedAt=_now(), exitCode=exit_code)
    _update(ctx, entry)


def _update(ctx: StageContext, entry: dict[str, Any]) -> None:
    record = read(ctx)
    if record is None or record.get("runUid") != ctx.invocation.run.uid:
        return  # replaced meanwhile (nothing else should write it)
    for i, old in enumerate(record["attempts"]):
        if old.get("number") == entry["number"]:
            record["attempts"][i] = entry
            write_json_atomic(record_path(ctx), record)
            return
