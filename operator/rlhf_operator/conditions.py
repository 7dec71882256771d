"""Run conditions, following the Kubernetes API conventions (metav1.Condition).

Four condition types are always present (set on the first visit, Unknown or False until known):
``Running``, ``Suspended``, ``Succeeded`` and ``Failed``. Reasons are the constants below (one
CamelCase word each); docs/operator.md lists them. ``lastTransitionTime`` only moves when the
status flips, so rewriting an unchanged condition is a no-op (and no status write happens).
"""

from __future__ import annotations

from rlhf_api.run import Condition, StageStatus

RUNNING = "Running"
SUSPENDED = "Suspended"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
TYPES = (RUNNING, SUSPENDED, SUCCEEDED, FAILED)

# Reasons.
INITIALIZING = "Initializing"  # first visit, nothing started yet
STAGE_PENDING = "StagePending"  # a stage's Job exists but its pod has not started (or is queued)
STAGE_RUNNING = "StageRunning"
SUSPEND_REQUESTED = "SuspendRequested"  # spec.suspend is true
NOT_SUSPENDED = "NotSuspended"
PIPELINE_COMPLETED = "PipelineCompleted"
IN_PROGRESS = "InProgress"
NO_FAILURE = "NoFailure"
RUN_FINISHED = "RunFinished"  # Running=False once the run succeeded or failed
# Failed=True reasons: why the failed stage's Job failed.
BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"  # retryable errors exhausted the Job's retries
DEADLINE_EXCEEDED = "DeadlineExceeded"  # activeDeadlineSeconds elapsed
CONFIG_ERROR = "ConfigError"  # the stage exited 2: its configuration cannot work (not retried)
INPUT_MISSING = "InputMissing"  # the stage exited 3: an input is missing (not retried)
STAGE_FAILED = "StageFailed"  # any other Job failure
STAGE_LOST = "StageLost"  # the failed stage's Job is gone and its reason with it
INVALID_SPEC = "InvalidSpec"  # the stored spec fails validation (stored before a stricter CRD): edit it
GANG_RESTART = "GangRestart"  # a Pod of a multi-node stage failed: all its Pods start again (an event, a stage reason)
ONE_NODE_VOLUME = "OneNodeVolume"  # event: a multi-node stage on a ReadWriteOnce workspace (its Pods share one node)
CONFIG_TOO_LARGE = "ConfigTooLarge"  # the stage's config exceeds what its Job's annotation may carry (children)
START_TIMEOUT = "StartTimeout"  # the stage's Pod did not start within runtime.startTimeoutSeconds
# A stage's reason (not a condition's): its Job waits for Kueue to admit it (runtime.queueName).
QUEUED = "Queued"
# A stage's reason: its Pod is in one of the steps of a normal start (observe.STARTING_REASONS:
# waiting for the scheduler, pulling the image, mounting volumes). One reason for all of them, so a
# start writes the status once instead of once per step (under a burst of starts those writes were
# most of the operator's); the start timeout's message still names Kubernetes' own reason.
STARTING = "Starting"
STARTING_MESSAGE = "the Pod is starting (scheduling, pulling its image, mounting its volumes)"

# Set only once a stage's watch raised an alarm (docs/watch.md): True while a stage's status carries
# findings, False once none does (the stage trained again without one).
REWARD_HACKING_SUSPECTED = "RewardHackingSuspected"
DETECTOR_FIRED = "DetectorFired"
NO_ALARM = "NoAlarm"

JOB_REASONS = {"BackoffLimitExceeded": BACKOFF_LIMIT_EXCEEDED, "DeadlineExceeded": DEADLINE_EXCEEDED}


def failure_reason(job_reason: str | None, exit_code: int | None) -> str:
    """The run's Failed reason from the Job's Failed reason and the stage's exit code."""
    if job_reason in JOB_REASONS:
        return JOB_REASONS[job_reason]
    if exit_code == 2:
        return CONFIG_ERROR
    if exit_code == 3:
        return INPUT_MISSING
    return STAGE_FAILED


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: str,
    reason: str,
    message: str,
    generation: int | None,
    now: str,
) -> list[Condition]:
    """A copy of ``conditions`` with ``type_`` set; the transition time changes only with the status."""
    out: list[Condition] = []
    found = False
    for cond in conditions:
        if cond.type != type_:
            out.append(cond)
            continue
        found = True
        changed = cond.status != status
        out.append(
            Condition(
                type=type_,
                status=status,  # type: ignore[arg-type]
                reason=reason,
                message=message,
                last_transition_time=now if changed else cond.last_transition_time,
                observed_generation=generation,
            )
        )
    if not found:
        out.append(
            Condition(
                type=type_,
                status=status,  # type: ignore[arg-type]
                reason=reason,
                message=message,
                last_transition_time=now,
                observed_generation=generation,
            )
        )
    order = {t: i for i, t in enumerate(TYPES)}
    return sorted(out, key=lambda c: order.get(c.type, len(TYPES)))


def get(conditions: list[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def is_true(conditions: list[Condition], type_: str) -> bool:
    cond = get(conditions, type_)
    return cond is not None and cond.status == "True"


def reward_hacking(
    conditions: list[Condition], stages: list[StageStatus], generation: int | None, now: str
) -> list[Condition]:
    """RewardHackingSuspected from the stages' findings: the evidence and which checkpoint was kept."""
    flagged = [s for s in stages if s.findings]
    if not flagged:
        if get(conditions, REWARD_HACKING_SUSPECTED) is None:
            return conditions
        return set_condition(conditions, REWARD_HACKING_SUSPECTED, "False", NO_ALARM, "", generation, now)
    parts = [f"{s.name}: {'; '.join(s.findings)}" + (f" ({s.selection})" if s.selection else "") for s in flagged]
    return set_condition(
        conditions, REWARD_HACKING_SUSPECTED, "True", DETECTOR_FIRED, " | ".join(parts)[:4000], generation, now
    )
