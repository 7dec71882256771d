"""The one place that decides what to do with a run: ``plan(run, observed, now) -> Plan``.

Pure and level-triggered: the plan depends only on the spec, the last written status and the child
objects observed now, never on which event woke the operator. Running it twice on the same input
gives the same plan, and running it on its own output's world gives no actions and no status change,
which is what makes re-applying a manifest, a missed event or an operator restart harmless.

Rules, in order: a finished run stays finished (until a retry is requested); stages run one at a
time in pipeline order; a stage's Job is created only when every earlier enabled stage succeeded;
spec.suspend suspends the active Job and holds back new ones.

How a pass is built: ``_stages_to_walk`` lists the stages (acting on a retry request, keeping a
finished run's list); ``_walk`` then goes through them in order and, for each, first ``detect``s its
cause from its status entry and its Job alone, then ``decide``s what to do about that cause given the
spec, until the stage the pipeline stands at; ``_summarise`` and ``_events`` derive the run's phase,
conditions and events from the result.

Kueue (runtime.queueName, the Job labelled with the LocalQueue): Kueue owns the Job's spec.suspend.
It unsuspends the Job when it admits its Workload and suspends it again to preempt it, so the operator
never patches it: the stage shows Pending with reason Queued while the Job waits, and a run's suspend
deletes the stage's Job (waiting for its Pod to stop) instead of suspending it, since Kueue would
unsuspend an admitted one at once. Resuming creates the Job again; it queues, and its Pod resumes
from the stage's last checkpoint on the workspace volume (docs/install.md, Kueue).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime

from rlhf_api.layout import RunRef, last_policy_stage, run_dir, stage_output
from rlhf_api.methods import INPUT_STAGES
from rlhf_api.names import RETRY_ANNOTATION
from rlhf_api.run import RLHFRunSpec, RLHFRunStatus, StageStatus
from rlhf_api.timestamps import format_timestamp, parse_timestamp

from . import conditions as cond
from .actions import Action, CreateJob, DeleteJob, EnsurePVC, PostEvent, SetJobSuspend
from .children import build_job, build_pvc, build_rendezvous_service, config_too_large, nodes
from .observe import STARTING_REASONS, JobObservation, Observed, Waiting
from .progress import merge_progress, summary

REWARD_KEYS = ("reward_mean", "reward/mean", "rewards/mean")


@dataclass(frozen=True)
class RunView:
    """The run as the planner reads it: which run (``ref``) and the state its decisions depend on.

    Not another name for a run: ``RunRef`` (rlhf_api.layout) only says which run, and is what the children
    and the stage invocation carry; a view adds what was read from the API server in this pass
    (generation, the defaulted spec, the last written status, the annotations), so it lives only as
    long as one reconcile.
    """

    name: str
    namespace: str
    uid: str
    generation: int
    spec: RLHFRunSpec
    status: RLHFRunStatus | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def ref(self) -> RunRef:
        return RunRef(namespace=self.namespace, name=self.name, uid=self.uid)


@dataclass(frozen=True)
class Plan:
    actions: list[Action]
    status: RLHFRunStatus
    finished: list[StageStatus] = field(default_factory=list)  # stages that finished in this pass (metrics)


def keep_started_pipeline(spec: RLHFRunSpec, status: RLHFRunStatus | None) -> RLHFRunSpec:
    """The spec as this run is planned: a run that started without the inputs stage keeps going without it.

    Why: the inputs stage came after some runs had started. Put first in their pipeline, it would give
    every later stage a new earlier output (their config hashes cover it), so the stage in progress
    would set its checkpoint aside and train again from step 0: an operator upgrade must not cost a
    run its training. A run whose status lists stages but not the inputs stage was planned without it
    (an older operator, or every input on the volume), and its stages go on downloading for themselves.
    """
    if status is None or not status.stages or not spec.inputs.enabled:
        return spec
    if any(s.name in INPUT_STAGES for s in status.stages):
        return spec
    return spec.model_copy(update={"inputs": spec.inputs.model_copy(update={"enabled": False})})


def _enabled(spec: RLHFRunSpec, stage: str) -> bool:
    section = spec.stage(stage)
    return section is not None and bool(section.enabled)


def _stage_list(spec: RLHFRunSpec, old: list[StageStatus]) -> list[StageStatus]:
    """One entry per pipeline stage, keeping what is known; disabled stages are Skipped."""
    by_name = {s.name: s for s in old}
    out = []
    for name in spec.pipeline():
        prev = by_name.get(name) or StageStatus(name=name)
        if not _enabled(spec, name) and prev.phase in ("Pending", "Skipped"):
            prev = StageStatus(name=name, phase="Skipped")
        elif _enabled(spec, name) and prev.phase == "Skipped":
            prev = StageStatus(name=name)
        out.append(prev)
    return out


def _with_job(st: StageStatus, job: JobObservation, now: str) -> StageStatus:
    """Fold what the Job and its pods say into the stage's entry.

    A Pod's result (its termination message) counts once its Job has finished: a Pod ends a moment
    before the Job controller marks its Job Complete or Failed, and folding the result in between
    would write the status twice for one transition (issue 14); a retried attempt's result is not the
    stage's either.
    """
    if not (job.complete or job.failed_condition):
        job = replace(job, result=None)
    if job.completions > 1:
        # A gang's attempts are its starts, which the planner counts (_gang_restart): its Pods are one attempt.
        attempts = max(st.attempts, 1 if job.pods or job.active else 0)
    else:
        attempts = max(st.attempts, job.pods, job.active + job.succeeded + job.failed)
    update: dict = {"job_name": job.name, "attempts": attempts}
    if st.start_time is None and (job.start_time or job.active):
        update["start_time"] = job.start_time or now
    update["progress"] = merge_progress(st, job, now)
    metrics = dict(st.metrics)
    if job.progress:
        metrics.update(job.progress.metrics)
        if job.progress.findings and not st.findings:
            # An alarm while the stage trains (action warn, or before stop/rollback takes effect): the
            # condition and the event now, not when the stage ends; the result's findings replace these.
            update["findings"] = list(job.progress.findings)
    if job.result is not None and job.result.stage:
        metrics.update(job.result.metrics)
        if job.result.artifact_path:
            update["artifact_path"] = job.result.artifact_path
        update["findings"] = list(job.result.findings)
        if job.result.inputs:  # the inputs stage: where each input came from (ResolvedInput)
            update["inputs"] = list(job.result.inputs)
        update["selection"] = job.result.selection_line()
        update["evaluations"] = list(job.result.evaluations) or None
        update["published"] = list(job.result.published)
    update["metrics"] = metrics
    return st.model_copy(update=update)


def _exit_code(job: JobObservation) -> int | None:
    """The stage's own exit code when it reported one (it keeps 2, 3, 143), else the container's."""
    return job.result.exit_code if job.result and job.result.exit_code else job.exit_code


def _starting(st: StageStatus) -> StageStatus:
    """Pending through a normal start (cond.STARTING): one reason for all its steps, so no write per step."""
    return st.model_copy(update={"phase": "Pending", "reason": cond.STARTING, "message": cond.STARTING_MESSAGE})


def _is_starting(st: StageStatus) -> bool:
    return st.phase == "Pending" and st.reason == cond.STARTING


def _quiet_start(listed: StageStatus, decided: StageStatus) -> StageStatus:
    """The entry as written while a normal start goes on: what the Job and its Pod add meanwhile
    (attempts, startTime) waits for the stage's next change (Running, or its end), which records it.

    Why: every status write is one of the few API writes a transition may cost (issue 14), and a
    start is one state for the user (cond.STARTING) from the Job's creation until its Pod runs, so a
    start writes the status twice (the Job created, the Pod running), not three times. Nothing is
    lost: attempts and startTime are read from the Job and its Pods again at that next change.
    """
    if _is_starting(listed) and _is_starting(decided) and listed.job_name == decided.job_name:
        return listed
    return decided


def _failure_message(stage: str, job: JobObservation, restarts: int = 0) -> tuple[str, str]:
    exit_code = _exit_code(job)
    reason = cond.failure_reason(job.reason, exit_code)
    detail = "; ".join(x for x in (job.message, job.result.message if job.result else None) if x)
    message = f"stage {stage} failed ({reason}"
    message += f", exit code {exit_code})" if exit_code else ")"
    if job.failed_pod:
        message += f": Pod {job.failed_pod} failed first"
    if restarts:
        message += f", after {restarts} gang restart{'s' if restarts > 1 else ''} (runtime.backoffLimit)"
    return reason, f"{message}: {detail}"[:4000] if detail else message


def _pending(
    st: StageStatus, waiting: Waiting, timeout: int | None, now: datetime, ts: str
) -> tuple[StageStatus, bool]:
    """The stage while its Pod cannot start: Pending with Kubernetes' reason, or Failed (StartTimeout)
    once it has waited longer than runtime.startTimeoutSeconds."""
    detail = f"{waiting.reason}: {waiting.message}" if waiting.message else waiting.reason
    since = parse_timestamp(waiting.since)
    if timeout is not None and since is not None and (now - since).total_seconds() > timeout:
        message = f"stage {st.name} did not start within {timeout} s (runtime.startTimeoutSeconds): {detail}"
        update = {"phase": "Failed", "completion_time": ts, "reason": cond.START_TIMEOUT, "message": message}
        return st.model_copy(update=update), True
    if waiting.reason in STARTING_REASONS:
        return _starting(st), False
    return st.model_copy(update={"phase": "Pending", "reason": waiting.reason, "message": detail[:4000]}), False


def _queued(st: StageStatus, job: JobObservation) -> StageStatus:
    """The stage while Kueue has not admitted its Job (first, or again after preempting it)."""
    message = f"Job {job.name} waits for Kueue to admit it (LocalQueue {job.queue})"
    if st.attempts:
        message += "; the stage ran before and resumes from its last checkpoint"
    return st.model_copy(update={"phase": "Pending", "reason": cond.QUEUED, "message": message})


# --- which stages the pass walks: the listed stages, a retry, and the finality of a finished run -----


@dataclass(frozen=True)
class _Retry:
    """What a retry request (a new value of the retry annotation) does before the stages are walked."""

    token: str
    stages: list[StageStatus]
    actions: list[Action]
    deleting: frozenset[str] = frozenset()  # stages whose old Job is being deleted: none is created yet
    restarted: bool = False  # the failed run runs again from its failed stage


def _retry(token: str, old: RLHFRunStatus, stages: list[StageStatus], jobs: Mapping[str, JobObservation]) -> _Retry:
    """Restart a failed run from its failed stage (deleting that stage's Job), or ignore the request."""
    failed = next((i for i, s in enumerate(stages) if s.phase == "Failed"), None)
    if old.phase != "Failed" or failed is None:
        event = PostEvent("Normal", "RetryIgnored", f"retry {token!r} ignored: the run has not failed")
        return _Retry(token, stages, [event])
    stages, deleting = list(stages), frozenset[str]()
    actions: list[Action] = []
    name = stages[failed].name
    if name in jobs:
        actions.append(DeleteJob(jobs[name].name))
        deleting = frozenset({name})
    stages[failed] = StageStatus(name=name, job_name=stages[failed].job_name)
    actions.append(PostEvent("Normal", "RetryRequested", f"retrying from stage {name} ({token})"))
    return _Retry(token, stages, actions, deleting, restarted=True)


def _stages_to_walk(
    run: RunView, old: RLHFRunStatus, jobs: Mapping[str, JobObservation]
) -> tuple[list[StageStatus], _Retry | None]:
    """The stage list this pass walks, and the retry it acts on, if one was requested.

    A failed run is final until retried (spec edits change nothing), a succeeded run is final.
    """
    stages = _stage_list(run.spec, old.stages)
    retry = None
    token = run.annotations.get(RETRY_ANNOTATION)
    if token and token != old.retry_token:
        retry = _retry(token, old, stages, jobs)
        stages = retry.stages
    elif old.phase == "Failed" and old.stages:
        stages = list(old.stages)
    if old.phase == "Succeeded":
        stages = list(old.stages)
    return stages, retry


# --- one stage: detect what its Job says (the cause), then decide what to do about it -----------------


class Cause(enum.Enum):
    """Where a stage stands, read from its status entry and its Job alone (never from the spec)."""

    SKIPPED = "recorded as skipped (disabled)"
    SUCCEEDED = "recorded as succeeded"
    FAILED = "recorded as failed"
    JOB_BEING_REPLACED = "its old Job is being deleted for a retry"
    SUCCEEDED_BEFORE = "no Job, but a later stage has one: it succeeded and its Job was deleted since"
    NO_JOB = "no Job"
    JOB_DELETING = "its Job is being deleted"
    JOB_COMPLETE = "its Job completed"
    JOB_FAILED = "its Job failed"
    JOB_LIVE = "its Job is neither finished nor being deleted"


def detect(st: StageStatus, job: JobObservation | None, replacing: bool, later_job: bool) -> Cause:
    """The stage's cause. ``replacing``: its old Job is being deleted (retry); ``later_job``: a later
    stage's Job exists."""
    if st.phase == "Skipped":
        return Cause.SKIPPED
    if st.phase == "Succeeded":
        return Cause.SUCCEEDED
    if st.phase == "Failed":
        return Cause.FAILED
    if replacing:
        return Cause.JOB_BEING_REPLACED
    if job is None:
        return Cause.SUCCEEDED_BEFORE if later_job else Cause.NO_JOB
    if job.deleting:
        return Cause.JOB_DELETING
    if job.complete:
        return Cause.JOB_COMPLETE
    if job.failed_condition:
        return Cause.JOB_FAILED
    return Cause.JOB_LIVE


@dataclass(frozen=True)
class Decision:
    """What the planner does about one stage: its new entry, the actions, and whether the walk stops.

    The walk stops at the stage where the pipeline stands (the run's current stage); it goes on past
    stages that are done or skipped.
    """

    stage: StageStatus
    stop: bool
    actions: list[Action] = field(default_factory=list)
    failure: tuple[str, str] | None = None  # (reason, message) of the run's failure
    finished: bool = False  # the stage finished in this pass (for metrics)


@dataclass(frozen=True)
class _Pass:
    """What every decision in one pass reads besides the stage and its Job."""

    run: RunView
    old: RLHFRunStatus
    now: datetime
    ts: str


def _suspended(st: StageStatus) -> StageStatus:
    return st.model_copy(update={"phase": "Suspended", "reason": None, "message": None})


def _recorded_failure(st: StageStatus, job: JobObservation | None) -> tuple[str, str]:
    """Why a stage already recorded as failed failed, for the run's Failed condition."""
    if job is not None and job.failed_condition:
        return _failure_message(st.name, job)
    if st.reason in (cond.START_TIMEOUT, cond.CONFIG_TOO_LARGE):  # the operator failed it (no Job, or suspended)
        return st.reason, st.message or f"stage {st.name} failed"
    reason = cond.STAGE_LOST if job is None else (st.reason or cond.STAGE_FAILED)  # None: its Job is gone
    return reason, st.message or f"stage {st.name} failed"


def _one_node_volume_warning(spec: RLHFRunSpec, stage: str) -> list[Action]:
    """A gang on a ReadWriteOnce workspace the operator made: its Pods can only share one node.

    A warning, not a refusal: admission cannot know whether the scheduler will put every Pod on one
    node (which works, e.g. several Pods on one 8-GPU node). An existingClaim's access modes are not
    known to the operator (it reads no PVC but its own), so it gets no warning (docs/operator.md)."""
    pods = nodes(spec, stage)
    if pods <= 1 or spec.storage.existing_claim is not None or "ReadWriteMany" in spec.storage.access_modes:
        return []
    message = (
        f"stage {stage} runs on {pods} Pods that all mount the workspace, a ReadWriteOnce volume: they can "
        "only run on one node (a Pod on another cannot attach it and waits until runtime.startTimeoutSeconds); "
        "to spread them over nodes, set spec.storage.accessModes: [ReadWriteMany]"
    )
    return [PostEvent("Warning", cond.ONE_NODE_VOLUME, message)]


def _start(st: StageStatus, p: _Pass) -> Decision:
    """No Job for the stage: create it, unless the run is suspended or finished."""
    spec = p.run.spec
    if not spec.suspend and p.old.phase not in ("Failed", "Succeeded"):
        job_manifest = build_job(p.run.ref, spec, st.name)
        too_large = config_too_large(job_manifest, st.name)
        if too_large is not None:
            # The API server would refuse the Job on every pass: fail the stage once, saying why.
            update = {"phase": "Failed", "completion_time": p.ts, "reason": cond.CONFIG_TOO_LARGE, "message": too_large}
            failed = st.model_copy(update=update)
            return Decision(failed, stop=True, failure=(cond.CONFIG_TOO_LARGE, too_large), finished=True)
        name = job_manifest["metadata"]["name"]
        service = build_rendezvous_service(p.run.ref, spec, st.name)
        actions: list[Action] = [CreateJob(job_manifest, service)]
        # No event for the Job's creation: the stage's StageStarted tells the start (issue 14: one
        # event per transition), and a start that stalls gets its StagePending or StageQueued.
        known = next((o for o in p.old.stages if o.name == st.name and o.phase == "Pending"), None)
        if known is None or known.job_name is None:
            actions += _one_node_volume_warning(spec, st.name)
        created = st.model_copy(update={"job_name": name})
        # Starting from the Job's creation: its Pod's first steps are then no change.
        return Decision(_starting(created) if st.phase == "Pending" else created, stop=True, actions=actions)
    if spec.suspend and st.job_name:
        # Its Job existed and is gone: with Kueue, the run's suspend deleted it.
        return Decision(_suspended(st), stop=True)
    return Decision(st, stop=True)


def _suspension_actions(suspend: bool, job: JobObservation) -> list[Action]:
    """Make a live Job's spec.suspend match the run's; Kueue owns a queued Job's, so it is only suspended."""
    if suspend and not job.suspended:
        return [SetJobSuspend(job.name, True)]
    if not suspend and job.suspended and not job.queue:
        return [SetJobSuspend(job.name, False)]
    return []


def _live(st: StageStatus, job: JobObservation, p: _Pass) -> Decision:
    """A live Job: suspend or resume it with the run, and tell queued, not started and running apart."""
    spec = p.run.spec
    # Kueue owns a queued Job's suspend (it would unsuspend an admitted Job the operator suspended), so
    # the run's suspend deletes that Job, keeping it until its Pod has stopped; resuming creates it again.
    if spec.suspend and job.queue:
        return Decision(_suspended(st), stop=True, actions=[DeleteJob(job.name, wait_for_pods=True)])
    actions = _suspension_actions(spec.suspend, job)
    if not spec.suspend and job.suspended and job.queue:
        # Not admitted yet, or preempted: not running, not failing, and not on the start clock.
        return Decision(_queued(st, job), stop=True, actions=actions)
    not_started = None if spec.suspend or job.suspended else job.waiting
    if not_started is not None:
        entry, timed_out = _pending(st, not_started, spec.runtime.start_timeout_seconds, p.now, p.ts)
        if not timed_out:
            return Decision(entry, stop=True, actions=actions)
        # Suspending deletes the Pod (and frees what it holds) but keeps the Job to inspect; Kueue
        # would unsuspend it, so a queued Job is deleted (which also frees its quota).
        actions.append(DeleteJob(job.name) if job.queue else SetJobSuspend(job.name, True))
        return Decision(
            entry, stop=True, actions=actions, failure=(cond.START_TIMEOUT, entry.message or ""), finished=True
        )
    if spec.suspend:
        phase = "Suspended"
    elif job.active or (st.phase in ("Running", "Suspended") and not job.suspended):
        phase = "Running"
    else:
        phase = "Pending"
    if phase == "Pending":  # the Job's Pod is not there yet, or about to be: a normal start's first step
        return Decision(_starting(st), stop=True, actions=actions)
    return Decision(st.model_copy(update={"phase": phase, "reason": None, "message": None}), stop=True, actions=actions)


def _gang_restart(st: StageStatus, job: JobObservation, p: _Pass) -> Decision | None:
    """A multi-node stage's failed Job, started again whole while runtime.backoffLimit allows; None: it fails.

    Its Job has backoffLimit 0, so its first failed Pod fails it (BackoffLimitExceeded); restarting
    one Pod of a gang cannot work (its peers lost their collective), so the operator deletes the Job,
    waiting until its Pods are gone (node 0's must not still hold the rendezvous port or write a
    checkpoint), and the next pass creates it again: every Pod resumes from the newest checkpoint.
    A config or input error (the podFailurePolicy's FailJob) or a deadline is not retried, as for a
    stage on one Pod. ``attempts`` counts the gang's starts: restarts used = attempts - 1.
    """
    limit = p.run.spec.runtime.backoff_limit
    used = max(st.attempts - 1, 0)
    if job.reason != "BackoffLimitExceeded" or used >= limit:
        return None
    exit_code = _exit_code(job)
    said = job.result.message if job.result is not None and job.result.message else ""
    why = f"exit code {exit_code}" + (f": {said}" if said else "") if exit_code else (said or "failed")
    message = (
        f"stage {st.name}: Pod {job.failed_pod or '?'} failed ({why}); restarting all {job.completions} Pods "
        f"from the newest checkpoint (gang restart {used + 1} of {limit}, runtime.backoffLimit)"
    )[:4000]
    update = {"attempts": used + 2, "reason": cond.GANG_RESTART, "message": message}
    actions: list[Action] = [DeleteJob(job.name, wait_for_pods=True), PostEvent("Warning", cond.GANG_RESTART, message)]
    return Decision(st.model_copy(update=update), stop=True, actions=actions)


def decide(cause: Cause, st: StageStatus, job: JobObservation | None, p: _Pass) -> Decision:
    """What to do about a stage, given its cause and the run's spec."""
    if cause in (Cause.SKIPPED, Cause.SUCCEEDED):
        return Decision(st, stop=False)
    if cause is Cause.FAILED:
        return Decision(st, stop=True, failure=_recorded_failure(st, job))
    if cause is Cause.JOB_BEING_REPLACED:
        return Decision(st, stop=True)  # the next pass, once it is gone, creates the new one
    if cause is Cause.SUCCEEDED_BEFORE:
        return Decision(
            st.model_copy(update={"phase": "Succeeded", "completion_time": st.completion_time or p.ts}), stop=False
        )
    if cause is Cause.NO_JOB:
        return _start(st, p)
    assert job is not None, cause  # every other cause is read from the stage's Job
    if cause is Cause.JOB_DELETING:
        # Being deleted by the run's suspend (a queued Job): its Pod is stopping.
        return Decision(_suspended(st) if p.run.spec.suspend and job.queue else st, stop=True)
    if cause is Cause.JOB_COMPLETE:
        # The stage's own word on success, when it says more than "done": whose output it reused, or
        # that it trained again and set the old output aside (docs/stage-protocol.md).
        said = job.result.message if job.result is not None and job.result.message != "done" else None
        update = {"phase": "Succeeded", "completion_time": job.completion_time or p.ts, "message": said}
        return Decision(st.model_copy(update=update), stop=False, finished=True)
    if cause is Cause.JOB_FAILED:
        restart = _gang_restart(st, job, p) if job.completions > 1 else None
        if restart is not None:
            return restart
        failure = _failure_message(st.name, job, max(st.attempts - 1, 0) if job.completions > 1 else 0)
        update = {"phase": "Failed", "completion_time": p.ts, "message": failure[1]}
        return Decision(st.model_copy(update=update), stop=True, failure=failure, finished=True)
    return _live(st, job, p)


@dataclass(frozen=True)
class _Walk:
    stages: list[StageStatus]
    actions: list[Action]
    current: str | None  # the stage the walk stopped at; None when every stage is done or skipped
    failure: tuple[str, str] | None
    finished: list[StageStatus]


def _walk(stages: list[StageStatus], jobs: Mapping[str, JobObservation], replacing: frozenset[str], p: _Pass) -> _Walk:
    """Decide each stage in pipeline order, up to the first one the pipeline stands at."""
    stages = list(stages)
    actions: list[Action] = []
    finished: list[StageStatus] = []
    for i, listed in enumerate(stages):
        job = jobs.get(listed.name)
        st = listed if job is None or listed.phase == "Skipped" else _with_job(listed, job, p.ts)
        later_job = any(s.name in jobs for s in stages[i + 1 :])
        decision = decide(detect(st, job, listed.name in replacing, later_job), st, job, p)
        stages[i] = _quiet_start(listed, decision.stage)
        actions += decision.actions
        if decision.finished:
            finished.append(decision.stage)
        if decision.stop:
            return _Walk(stages, actions, st.name, decision.failure, finished)
    return _Walk(stages, actions, None, None, finished)


def plan(run: RunView, observed: Observed, now: datetime) -> Plan:
    ts = format_timestamp(now)
    old = run.status or RLHFRunStatus()
    status = old.model_copy(deep=True)
    status.observed_generation = run.generation
    stages, retry = _stages_to_walk(run, old, observed.jobs)
    replacing = retry.deleting if retry else frozenset[str]()
    # A Job being deleted for a retry is no longer the stage's Job: no decision may read it as one.
    jobs = {stage: job for stage, job in observed.jobs.items() if stage not in replacing}
    actions: list[Action] = []
    if retry is not None:
        status.retry_token = retry.token
        actions += retry.actions
        if retry.restarted:
            status.phase, status.completion_time = "Running", None

    if run.spec.storage.existing_claim is None and not observed.pvc_exists and old.phase != "Succeeded":
        actions.append(EnsurePVC(build_pvc(run.ref, run.spec)))

    walk = _walk(stages, jobs, replacing, _Pass(run, old, now, ts))
    status.stages = walk.stages
    _summarise(run, status, walk.current, walk.failure, ts)
    told = retry is not None and retry.restarted  # its RetryRequested tells the run's restart
    actions += walk.actions + _events(run, old, status, ts, told)
    return Plan(actions=actions, status=status, finished=walk.finished)


def _summarise(
    run: RunView, status: RLHFRunStatus, current: str | None, failure: tuple[str, str] | None, ts: str
) -> None:
    """Phase, conditions, progress, reward and output model from the stage list."""
    spec, gen = run.spec, run.generation
    stages = status.stages
    todo = [s for s in stages if s.phase != "Skipped"]
    done = [s for s in todo if s.phase == "Succeeded"]
    if failure is not None:
        phase = "Failed"
    elif current is None and todo:
        phase = "Succeeded"
    elif spec.suspend:
        phase = "Suspended"
    elif any(s.phase == "Running" for s in stages):
        phase = "Running"
    else:
        phase = "Pending" if not done and status.phase in ("Pending",) else "Running"
        if not any(s.job_name for s in stages):
            phase = "Pending"
    status.phase = phase  # type: ignore[assignment]
    status.current_stage = current or (status.current_stage if phase != "Succeeded" else None)
    starts = [s.start_time for s in stages if s.start_time]
    status.start_time = status.start_time or (min(starts) if starts else None)
    if phase in ("Succeeded", "Failed"):
        status.completion_time = status.completion_time or ts
    running = next((s for s in stages if s.name == current), None)
    status.progress = summary(len(done), len(todo), running)
    policy = last_policy_stage(spec)
    metrics = next((s.metrics for s in stages if s.name == policy), {}) if policy else {}
    status.reward = next((metrics[k] for k in REWARD_KEYS if k in metrics), status.reward)
    if phase == "Succeeded":
        base = run_dir(run.namespace, run.name)
        merge = next((s for s in stages if s.name == "merge" and s.phase == "Succeeded"), None)
        last = merge or (done[-1] if done else None)
        status.output_model = str(stage_output(base, last.name) / "model") if last else None
        status.published = next((list(s.published) for s in stages if s.published), [])

    c = status.conditions
    what = f"stage {current}" if current else "the pipeline"
    if phase == "Running":
        c = cond.set_condition(c, cond.RUNNING, "True", cond.STAGE_RUNNING, f"running {what}", gen, ts)
    elif phase == "Pending" or (running is not None and running.phase == "Pending" and running.reason):
        reason = cond.STAGE_PENDING if current and any(s.job_name for s in stages) else cond.INITIALIZING
        why = f": {running.message}" if running is not None and running.message else ""
        c = cond.set_condition(c, cond.RUNNING, "Unknown", reason, f"waiting for {what} to start{why}", gen, ts)
    elif phase == "Suspended":
        c = cond.set_condition(c, cond.RUNNING, "False", cond.SUSPEND_REQUESTED, "spec.suspend is true", gen, ts)
    else:
        c = cond.set_condition(c, cond.RUNNING, "False", cond.RUN_FINISHED, f"the run {phase.lower()}", gen, ts)
    if phase == "Suspended":
        c = cond.set_condition(c, cond.SUSPENDED, "True", cond.SUSPEND_REQUESTED, f"suspended at {what}", gen, ts)
    else:
        c = cond.set_condition(c, cond.SUSPENDED, "False", cond.NOT_SUSPENDED, "", gen, ts)
    if phase == "Succeeded":
        msg = f"all stages succeeded; output model {status.output_model}"
        if status.published:
            msg += f", published to {', '.join(status.published)}"
        c = cond.set_condition(c, cond.SUCCEEDED, "True", cond.PIPELINE_COMPLETED, msg, gen, ts)
    else:
        c = cond.set_condition(
            c, cond.SUCCEEDED, "False", cond.IN_PROGRESS, f"{len(done)}/{len(todo)} stages done", gen, ts
        )
    if failure is not None:
        c = cond.set_condition(c, cond.FAILED, "True", failure[0], failure[1], gen, ts)
    else:
        c = cond.set_condition(c, cond.FAILED, "False", cond.NO_FAILURE, "", gen, ts)
    status.conditions = cond.reward_hacking(c, stages, gen, ts)


STAGE_EVENTS = {
    "Running": ("Normal", "StageStarted"),
    "Succeeded": ("Normal", "StageSucceeded"),
    "Failed": ("Warning", "StageFailed"),
    "Suspended": ("Normal", "StageSuspended"),
}
RUN_EVENTS = {
    "Running": ("Normal", "RunRunning"),
    "Succeeded": ("Normal", "RunSucceeded"),
    "Failed": ("Warning", "RunFailed"),
    "Suspended": ("Normal", "RunSuspended"),
}


def _events(run: RunView, old: RLHFRunStatus, new: RLHFRunStatus, ts: str, told: bool = False) -> list[Action]:
    """One event per transition: of each stage's phase, of the run's phase, and of the spec while running.

    Each event is a write, and transitions are what the operator must serve fastest (issue 14), so a
    pass tells one change once. The run's end replaces the event of the stage that ended it (its
    message names that stage and, on success, carries what the stage said); a run's other phase
    changes (Running, Suspended) are told by the stage event of the same pass, and get their own
    event only when no stage changed phase and the pass said nothing else (``told``: a retry).
    """
    out: list[Action] = []
    by_stage: dict[str, PostEvent] = {}  # the phase events of this pass
    before = {s.name: s for s in old.stages}
    for st in new.stages:
        prev = before.get(st.name)
        stuck = st.phase == "Pending" and st.reason and st.reason != cond.STARTING
        if stuck and (prev is None or prev.reason != st.reason):
            if st.reason == cond.QUEUED:
                out.append(PostEvent("Normal", "StageQueued", f"stage {st.name} is queued: {st.message}"))
            else:
                out.append(PostEvent("Warning", "StagePending", f"stage {st.name} cannot start: {st.message}"))
        # The first finding is the news: the result repeating (or adding to) the live alarm posts no second event.
        if st.findings and (prev is None or prev.findings[:1] != st.findings[:1]):
            kept = f"; output {st.selection}" if st.selection else ""
            out.append(PostEvent("Warning", cond.REWARD_HACKING_SUSPECTED, f"stage {st.name}: {st.findings[0]}{kept}"))
        if prev is not None and prev.phase == st.phase:
            continue
        if prev is not None and prev.phase == "Suspended" and st.phase in ("Pending", "Running"):
            # Resumed: told once, when the run's suspend is lifted (its Pod may still have to start).
            by_stage[st.name] = PostEvent("Normal", "StageResumed", f"stage {st.name} resumed")
            out.append(by_stage[st.name])
        elif st.phase in STAGE_EVENTS:
            kind, reason = STAGE_EVENTS[st.phase]
            by_stage[st.name] = PostEvent(kind, reason, st.message or f"stage {st.name} {st.phase.lower()}")
            out.append(by_stage[st.name])
    if new.phase != old.phase and new.phase in RUN_EVENTS and (run.status is not None or new.phase != "Pending"):
        kind, reason = RUN_EVENTS[new.phase]
        ended = next((s for s in reversed(new.stages) if s.name in by_stage and s.phase == new.phase), None)
        if new.phase in ("Succeeded", "Failed"):
            if ended is not None:
                out.remove(by_stage[ended.name])
            out.append(PostEvent(kind, reason, _run_end_message(new, ended)))
        elif not by_stage and not told:
            out.append(PostEvent(kind, reason, f"run {new.phase.lower()} ({new.progress or ''})"))
    seen = old.observed_generation
    if seen is not None and seen != run.generation and old.phase in ("Running", "Suspended", "Pending"):
        out.append(
            PostEvent("Normal", "SpecChanged", f"generation {run.generation}: applies to stages not started yet")
        )
    return out


def _run_end_message(new: RLHFRunStatus, ended: StageStatus | None) -> str:
    """A finished run's event: why it failed (the Failed condition names the stage), or that it
    succeeded, after what the last stage said (its own StageSucceeded is not posted)."""
    failed = next((c.message for c in new.conditions if c.type == cond.FAILED and c.status == "True"), "")
    if failed:
        return failed
    succeeded = next((c.message for c in new.conditions if c.type == cond.SUCCEEDED and c.status == "True"), "")
    what = succeeded or f"run {new.phase.lower()} ({new.progress or ''})"
    if ended is None:
        return what
    said = f"stage {ended.name} succeeded" + (f": {ended.message}" if ended.message else "")
    return f"{said}; {what}"
