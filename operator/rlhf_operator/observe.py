"""Turn the child objects read from the API server (wire-form dicts) into what the planner reasons about.

Pure: no client calls here. A Job becomes a :class:`JobObservation`; its Pods contribute the
stage's reported results (the container's termination message, a :class:`StageResult` as JSON)
and live progress (the ``rlhf-operator.io/progress`` Pod annotation, see docs/operator.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from .api.layout import StageResult
from .children import CONTAINER_NAME, DOMAIN, LABEL_STAGE

PROGRESS_ANNOTATION = f"{DOMAIN}/progress"
CONTROLLER_UID_LABEL = "batch.kubernetes.io/controller-uid"


@dataclass(frozen=True)
class Progress:
    """Live progress of a stage's current pod."""

    step: int = 0
    total_steps: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)


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
    progress: Progress | None = None  # from the running pod's annotation


@dataclass(frozen=True)
class Observed:
    """Everything read from the cluster for one run."""

    jobs: dict[str, JobObservation] = field(default_factory=dict)  # by stage
    pvc_exists: bool = True


def _condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return cond
    return None


def parse_result(message: str | None) -> StageResult | None:
    """A termination message as a StageResult, or None when it is not one (e.g. a log tail)."""
    if not message:
        return None
    try:
        return StageResult.model_validate(json.loads(message), strict=False)
    except (ValueError, ValidationError):
        return None


def parse_progress(text: str | None) -> Progress | None:
    """The progress annotation: the stage's progress file (step, totalSteps, metrics) as JSON."""
    if not text:
        return None
    try:
        body = json.loads(text)
        metrics = {str(k): float(v) for k, v in (body.get("metrics") or {}).items() if isinstance(v, int | float)}
        total = body.get("totalSteps")
        return Progress(int(body.get("step") or 0), int(total) if total else None, metrics)
    except (ValueError, TypeError, AttributeError):
        return None


def _terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == CONTAINER_NAME:
            state = status.get("state") or {}
            return state.get("terminated") or (status.get("lastState") or {}).get("terminated")
    return None


def _pod_sort_key(pod: dict[str, Any]) -> tuple[str, str]:
    meta = pod.get("metadata") or {}
    return (meta.get("creationTimestamp") or "", meta.get("name") or "")


def observe_job(job: dict[str, Any], pods: list[dict[str, Any]]) -> JobObservation:
    """A Job and the Pods it owns (others are ignored: a retried stage's Job has a new uid)."""
    meta = job.get("metadata") or {}
    status = job.get("status") or {}
    uid = meta.get("uid") or ""
    own = sorted(
        (p for p in pods if (p.get("metadata") or {}).get("labels", {}).get(CONTROLLER_UID_LABEL) == uid),
        key=_pod_sort_key,
    )
    result: StageResult | None = None
    exit_code: int | None = None
    for pod in reversed(own):  # the newest pod that has finished speaks for the stage
        terminated = _terminated(pod)
        if terminated is not None:
            exit_code = int(terminated.get("exitCode") or 0)
            result = parse_result(terminated.get("message"))
            if result is None and terminated.get("message"):
                result = StageResult(
                    stage="",
                    succeeded=False,
                    message=terminated["message"][-1000:],
                    exit_code=int(terminated.get("exitCode") or 0),
                )
            break
    progress = None
    running = [p for p in own if (p.get("status") or {}).get("phase") in (None, "Pending", "Running")]
    if running:
        progress = parse_progress(
            ((running[-1].get("metadata") or {}).get("annotations") or {}).get(PROGRESS_ANNOTATION)
        )
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
    )


def observe(run_uid: str, jobs: list[dict[str, Any]], pods: list[dict[str, Any]], pvc_exists: bool = True) -> Observed:
    """Adopt the Jobs this run controls (by owner uid), keyed by their stage label."""
    out: dict[str, JobObservation] = {}
    for job in jobs:
        owners = (job.get("metadata") or {}).get("ownerReferences") or []
        if not any(o.get("uid") == run_uid and o.get("controller") for o in owners):
            continue
        obs = observe_job(job, pods)
        if obs.stage:
            out[obs.stage] = obs
    return Observed(jobs=out, pvc_exists=pvc_exists)
