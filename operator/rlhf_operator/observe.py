"""Turn the child objects read from the API server (wire-form dicts) into what the planner reasons about.

Pure: no client calls here. A Job becomes a :class:`JobObservation`; its Pods contribute the
stage's reported results (the container's termination message, a :class:`StageResult` as JSON)
and live progress. Live progress comes from the stage container's log (the last
``rlhf-progress {...}`` line of its tail, read by the reconciler and handed in here parsed), or,
under the local kubelet, which has no pod logs, from the ``rlhf-operator.io/progress`` Pod
annotation; both carry the same JSON and go through :func:`parse_progress` (docs/operator.md).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from rlhf_api.layout import MAX_FINDING_CHARS, MAX_PROGRESS_FINDINGS, PROGRESS_LOG_MARKER, StageResult
from rlhf_api.names import (
    CONTROLLER_UID_LABEL,
    JOB_COMPLETION_INDEX_LABEL,
    KUEUE_QUEUE_LABEL,
    LABEL_STAGE,
    PROGRESS_ANNOTATION,
)

from .children import CONTAINER_NAME


@dataclass(frozen=True)
class Progress:
    """Live progress of a stage's current pod."""

    step: int = 0
    total_steps: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    findings: tuple[str, ...] = ()  # the watch's alarms so far (docs/watch.md), before the stage's result


@dataclass(frozen=True)
class Waiting:
    """Why a stage's newest Pod has not started, in Kubernetes' words."""

    reason: str  # Unschedulable, ErrImagePull, ImagePullBackOff, CreateContainerConfigError, ContainerCreating, ...
    message: str
    since: str  # the Pod's creation time (RFC 3339): the wait is bounded by runtime.startTimeoutSeconds


# Reasons a Pod passes through on its way to running; every other reason means it is stuck.
STARTING_REASONS = frozenset({"ContainerCreating", "PodInitializing", "Scheduling"})


@dataclass(frozen=True)
class JobObservation:
    """What the operator knows about one stage's Job (and its Pods)."""

    name: str
    stage: str
    uid: str = ""
    suspended: bool = False  # spec.suspend
    deleting: bool = False
    active: int = 0
    succeeded: int = 0
    failed: int = 0
    pods: int = 0  # pods of this Job seen (each attempt is one pod)
    complete: bool = False
    failed_condition: bool = False
    suspended_condition: bool = False
    reason: str | None = None  # the Failed condition's reason (BackoffLimitExceeded, ...)
    message: str | None = None
    start_time: str | None = None
    completion_time: str | None = None
    result: StageResult | None = None  # from the newest terminated container
    exit_code: int | None = None  # of the newest terminated container
    progress: Progress | None = None  # from the running pod's log (or, local kubelet, its annotation)
    waiting: Waiting | None = None  # the newest live pod has not started: why
    queue: str | None = None  # the Kueue LocalQueue its label names: Kueue, not the operator, unsuspends it
    completions: int = 1  # the Job's Pods: above 1, a multi-node stage's gang (an Indexed Job)
    failed_pod: str | None = None  # a gang's first failed Pod, e.g. "run-sft-1-x7k2p (node 1 of 4)"


@dataclass(frozen=True)
class Observed:
    """Everything read from the cluster for one run."""

    jobs: dict[str, JobObservation] = field(default_factory=dict)  # by stage
    pvc_exists: bool = True


# The Job conditions read here (the watch cache keeps no others).
JOB_CONDITIONS = ("Complete", "Failed", "Suspended")


def _condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return cond
    return None


def job_finished(job: dict[str, Any]) -> bool:
    """The Job controller has marked the Job Complete or Failed: its stage has ended."""
    return _condition(job, "Complete") is not None or _condition(job, "Failed") is not None


def parse_result(message: str | None) -> StageResult | None:
    """A termination message as a StageResult, or None when it is not one (e.g. a log tail)."""
    if not message:
        return None
    try:
        return StageResult.model_validate(json.loads(message), strict=False)
    except (ValueError, ValidationError):
        return None


def parse_progress(text: str | None) -> Progress | None:
    """A progress report (step, totalSteps, metrics) as JSON, from a log line or the dev annotation.

    Non-finite metrics (NaN, inf: valid for Python's json, not for the API server) are dropped.
    """
    if not text:
        return None
    try:
        body = json.loads(text)
        metrics = {
            str(k): float(v)
            for k, v in (body.get("metrics") or {}).items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        }
        total = body.get("totalSteps")
        raw = body.get("findings")
        findings = [str(f)[:MAX_FINDING_CHARS] for f in raw[:MAX_PROGRESS_FINDINGS]] if isinstance(raw, list) else []
        return Progress(int(body.get("step") or 0), int(total) if total else None, metrics, tuple(findings))
    except (ValueError, TypeError, AttributeError, OverflowError):
        return None


def parse_progress_log(log: str | None) -> Progress | None:
    """The newest progress report in a log tail: the last line holding the marker whose JSON parses.

    The marker may follow a prefix (a launcher's ``[rank0]:``, a line another writer left
    unfinished); a line cut short or garbled is skipped for the one before it.
    """
    for line in reversed((log or "").splitlines()):
        at = line.find(PROGRESS_LOG_MARKER + " ")
        if at < 0:
            continue
        progress = parse_progress(line[at + len(PROGRESS_LOG_MARKER) + 1 :].strip())
        if progress is not None:
            return progress
    return None


def log_readable(pod: dict[str, Any]) -> bool:
    """Whether the pod's stage container is running on a node: only then can its log hold live progress."""
    if not (pod.get("spec") or {}).get("nodeName") or (pod.get("status") or {}).get("phase") != "Running":
        return False
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    if completion_index(pod) not in (None, "0"):  # a gang's other nodes print no progress: not read
        return False
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == CONTAINER_NAME:
            return bool((status.get("state") or {}).get("running"))
    return False


def _terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == CONTAINER_NAME:
            state = status.get("state") or {}
            return state.get("terminated") or (status.get("lastState") or {}).get("terminated")
    return None


def pod_waiting(pod: dict[str, Any]) -> Waiting | None:
    """Why a live Pod is not running yet, or None when it runs (or ran).

    A Job counts such a Pod as active, so without this a Pod that can never start (its image does
    not exist, a Secret it needs is missing, no node fits it) would look like a running stage.
    """
    status = pod.get("status") or {}
    if status.get("phase") not in (None, "Pending"):
        return None
    since = (pod.get("metadata") or {}).get("creationTimestamp") or ""
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            reason = condition.get("reason") or "Unschedulable"
            return Waiting(reason, condition.get("message") or "", since)
    for container in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        waiting = (container.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason"):
            return Waiting(waiting["reason"], waiting.get("message") or "", since)
    if not (pod.get("spec") or {}).get("nodeName"):
        return Waiting("Scheduling", "waiting for the scheduler", since)
    return Waiting("ContainerCreating", "", since)


def _pod_sort_key(pod: dict[str, Any]) -> tuple[str, str]:
    meta = pod.get("metadata") or {}
    return (meta.get("creationTimestamp") or "", meta.get("name") or "")


def completion_index(pod: dict[str, Any]) -> str | None:
    """A multi-node stage's Pod's node rank (its Indexed Job's completion index); None for a lone Pod."""
    return ((pod.get("metadata") or {}).get("labels") or {}).get(JOB_COMPLETION_INDEX_LABEL)


def _spoke(pod: dict[str, Any]) -> tuple[StageResult | None, int | None]:
    """What a Pod's finished stage container said: its StageResult (or its log tail) and exit code."""
    terminated = _terminated(pod)
    if terminated is None:
        return None, None
    exit_code = int(terminated.get("exitCode") or 0)
    result = parse_result(terminated.get("message"))
    if result is None and terminated.get("message"):
        result = StageResult(stage="", succeeded=False, message=terminated["message"][-1000:], exit_code=exit_code)
    return result, exit_code


def _pod_progress(pod: dict[str, Any], logged: Mapping[str, Progress] | None) -> Progress | None:
    """A live Pod's progress: from its log (read by the reconciler), else the local kubelet's annotation."""
    meta = pod.get("metadata") or {}
    return (logged or {}).get(meta.get("name") or "") or parse_progress(
        (meta.get("annotations") or {}).get(PROGRESS_ANNOTATION)
    )


@dataclass(frozen=True)
class _Gang:
    """What a multi-node stage's Pods say together: node 0 speaks for the stage, unless a Pod failed."""

    result: StageResult | None
    exit_code: int | None
    failed_pod: str | None
    progress_pod: dict[str, Any] | None
    waiting: Waiting | None


def _observe_gang(own: list[dict[str, Any]], size: int) -> _Gang:
    """A gang's result, first failure, node 0's live Pod (progress) and why a Pod of it cannot start.

    The first Pod to fail is the cause (the others then lose their peers and fail after it), so it
    names the failure; otherwise node 0's newest finished Pod is the stage's result, since only
    global rank 0 writes the outputs and the StageResult. A gang runs only once all its Pods run: a
    Pod stuck waiting (no node fits, image pull) is reported before one that is merely starting.
    """

    def finished_at(pod: dict[str, Any]) -> str:
        return str((_terminated(pod) or {}).get("finishedAt") or "")

    failed = [p for p in own if (_terminated(p) or {}).get("exitCode") not in (None, 0)]
    if failed:
        first = min(failed, key=lambda p: (finished_at(p), *_pod_sort_key(p)))
        result, exit_code = _spoke(first)
        name = (first.get("metadata") or {}).get("name") or ""
        failed_pod = f"{name} (node {completion_index(first)} of {size})"
    else:
        zeros = [p for p in own if completion_index(p) == "0" and _terminated(p) is not None]
        result, exit_code = _spoke(zeros[-1]) if zeros else (None, None)
        failed_pod = None
    live = [
        p
        for p in own
        if (p.get("status") or {}).get("phase") in (None, "Pending", "Running")
        and not (p.get("metadata") or {}).get("deletionTimestamp")
    ]
    zero = [p for p in live if completion_index(p) == "0"]
    waits = []
    for pod in live:
        waiting = pod_waiting(pod)
        if waiting is not None:
            name = (pod.get("metadata") or {}).get("name") or ""
            where = f"Pod {name} (node {completion_index(pod)} of {size})"
            waits.append((waiting.reason in STARTING_REASONS, int(completion_index(pod) or 0), where, waiting))
    waiting = None
    if waits:
        _, _, where, first_wait = min(waits, key=lambda w: w[:2])
        message = f"{where}: {first_wait.message}" if first_wait.message else where
        waiting = Waiting(first_wait.reason, message, first_wait.since)
    return _Gang(result, exit_code, failed_pod, zero[-1] if zero else None, waiting)


def observe_job(
    job: dict[str, Any], pods: list[dict[str, Any]], logged: Mapping[str, Progress] | None = None
) -> JobObservation:
    """A Job and the Pods it owns (others are ignored: a retried stage's Job has a new uid).

    ``logged``: live progress read from pod logs, by pod name; it wins over the dev annotation.
    """
    meta = job.get("metadata") or {}
    status = job.get("status") or {}
    uid = meta.get("uid") or ""
    own = sorted(
        (p for p in pods if (p.get("metadata") or {}).get("labels", {}).get(CONTROLLER_UID_LABEL) == uid),
        key=_pod_sort_key,
    )
    completions = int((job.get("spec") or {}).get("completions") or 1)
    failed_pod = None
    if completions > 1:
        gang = _observe_gang(own, completions)
        result, exit_code, failed_pod, waiting = gang.result, gang.exit_code, gang.failed_pod, gang.waiting
        progress = _pod_progress(gang.progress_pod, logged) if gang.progress_pod is not None else None
    else:
        finished = [p for p in own if _terminated(p) is not None]
        result, exit_code = _spoke(finished[-1]) if finished else (None, None)  # the newest finished Pod speaks
        progress = None
        waiting = None
        running = [p for p in own if (p.get("status") or {}).get("phase") in (None, "Pending", "Running")]
        if running:
            newest = running[-1]
            waiting = None if (newest.get("metadata") or {}).get("deletionTimestamp") else pod_waiting(newest)
            progress = _pod_progress(newest, logged)
    failed = _condition(job, "Failed")
    return JobObservation(
        name=meta.get("name", ""),
        stage=(meta.get("labels") or {}).get(LABEL_STAGE, ""),
        uid=uid,
        suspended=bool((job.get("spec") or {}).get("suspend")),
        deleting=bool(meta.get("deletionTimestamp")),
        active=int(status.get("active") or 0),
        succeeded=int(status.get("succeeded") or 0),
        failed=int(status.get("failed") or 0),
        pods=len(own),
        complete=_condition(job, "Complete") is not None,
        failed_condition=failed is not None,
        suspended_condition=_condition(job, "Suspended") is not None,
        reason=failed.get("reason") if failed else None,
        message=failed.get("message") if failed else None,
        start_time=status.get("startTime"),
        completion_time=status.get("completionTime"),
        result=result,
        exit_code=exit_code,
        progress=progress,
        waiting=waiting,
        queue=(meta.get("labels") or {}).get(KUEUE_QUEUE_LABEL) or None,
        completions=completions,
        failed_pod=failed_pod,
    )


def observe(
    run_uid: str,
    jobs: list[dict[str, Any]],
    pods: list[dict[str, Any]],
    pvc_exists: bool = True,
    logged: Mapping[str, Progress] | None = None,
) -> Observed:
    """Adopt the Jobs this run controls (by owner uid), keyed by their stage label.

    ``logged``: live progress parsed from the running pods' logs, by pod name.
    """
    out: dict[str, JobObservation] = {}
    for job in jobs:
        owners = (job.get("metadata") or {}).get("ownerReferences") or []
        if not any(o.get("uid") == run_uid and o.get("controller") for o in owners):
            continue
        obs = observe_job(job, pods, logged)
        if obs.stage:
            out[obs.stage] = obs
    return Observed(jobs=out, pvc_exists=pvc_exists)
