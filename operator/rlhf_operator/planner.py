"""The one place that decides what to do with a run: ``plan(run, observed, now) -> Plan``.

Pure and level-triggered: the plan depends only on the spec, the last written status and the child
objects observed now, never on which event woke the operator. Running it twice on the same input
gives the same plan, and running it on its own output's world gives no actions and no status change,
which is what makes re-applying a manifest, a missed event or an operator restart harmless.

Rules, in order: a finished run stays finished (until a retry is requested); stages run one at a
time in pipeline order; a stage's Job is created only when every earlier enabled stage succeeded;
spec.suspend suspends the active Job and holds back new ones.

Kueue (runtime.queueName, the Job labelled with the LocalQueue): Kueue owns the Job's spec.suspend.
It unsuspends the Job when it admits its Workload and suspends it again to preempt it, so the operator
never patches it: the stage shows Pending with reason Queued while the Job waits, and a run's suspend
deletes the stage's Job (waiting for its Pod to stop) instead of suspending it, since Kueue would
unsuspend an admitted one at once. Resuming creates the Job again; it queues, and its Pod resumes
from the stage's last checkpoint on the workspace volume (docs/install.md, Kueue).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from rlhf_api.layout import last_policy_stage, run_dir, stage_output
from rlhf_api.run import RLHFRunSpec, RLHFRunStatus, StageStatus

from . import conditions as cond
from .actions import Action, CreateJob, DeleteJob, EnsurePVC, PostEvent, SetJobSuspend
from .children import RunIdentity, build_config_map, build_job, build_pvc
from .observe import STARTING_REASONS, JobObservation, Observed, Waiting
from .progress import merge_progress, parse_timestamp, summary

RETRY_ANNOTATION = "rlhf-operator.io/retry"
REWARD_KEYS = ("reward_mean", "reward/mean", "rewards/mean")


@dataclass(frozen=True)
class RunView:
    """The run as the planner needs it."""

    name: str
    namespace: str
    uid: str
    generation: int
    spec: RLHFRunSpec
    status: RLHFRunStatus | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def identity(self) -> RunIdentity:
        return RunIdentity(self.name, self.namespace, self.uid)


@dataclass(frozen=True)
class Plan:
    actions: list[Action]
    status: RLHFRunStatus
    finished: list[StageStatus] = field(default_factory=list)  # stages that finished in this pass (metrics)


def timestamp(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


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
    """Fold what the Job and its pods say into the stage's entry."""
    attempts = max(st.attempts, job.pods, job.active + job.succeeded + job.failed)
    update: dict = {"job_name": job.name, "attempts": attempts}
    if st.start_time is None and (job.start_time or job.active):
        update["start_time"] = job.start_time or now
    update["progress"] = merge_progress(st, job, now)
    metrics = dict(st.metrics)
    if job.progress:
        metrics.update(job.progress.metrics)
    if job.result is not None and job.result.stage:
        metrics.update(job.result.metrics)
        if job.result.artifact_path:
            update["artifact_path"] = job.result.artifact_path
    update["metrics"] = metrics
    return st.model_copy(update=update)


def _failure_message(stage: str, job: JobObservation) -> tuple[str, str]:
    exit_code = job.result.exit_code if job.result and job.result.exit_code else job.exit_code
    reason = cond.failure_reason(job.reason, exit_code)
    detail = "; ".join(x for x in (job.message, job.result.message if job.result else None) if x)
    message = f"stage {stage} failed ({reason}"
    message += f", exit code {exit_code})" if exit_code else ")"
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
    return st.model_copy(update={"phase": "Pending", "reason": waiting.reason, "message": detail[:4000]}), False


def _queued(st: StageStatus, job: JobObservation) -> StageStatus:
    """The stage while Kueue has not admitted its Job (first, or again after preempting it)."""
    message = f"Job {job.name} waits for Kueue to admit it (LocalQueue {job.queue})"
    if st.attempts:
        message += "; the stage ran before and resumes from its last checkpoint"
    return st.model_copy(update={"phase": "Pending", "reason": cond.QUEUED, "message": message})


def plan(run: RunView, observed: Observed, now: datetime) -> Plan:
    ts = timestamp(now)
    spec = run.spec
    old = run.status or RLHFRunStatus()
    status = old.model_copy(deep=True)
    status.observed_generation = run.generation
    actions: list[Action] = []
    stages = _stage_list(spec, old.stages)
    jobs = dict(observed.jobs)
    waiting: set[str] = set()  # stages whose old Job is being deleted (retry)

    # Retry: a new value of the annotation restarts a failed run from its failed stage.
    token = run.annotations.get(RETRY_ANNOTATION)
    if token and token != old.retry_token:
        status.retry_token = token
        failed = next((i for i, s in enumerate(stages) if s.phase == "Failed"), None)
        if old.phase == "Failed" and failed is not None:
            name = stages[failed].name
            if name in jobs:
                actions.append(DeleteJob(jobs.pop(name).name))
                waiting.add(name)
            stages[failed] = StageStatus(name=name, job_name=stages[failed].job_name)
            status.phase, status.completion_time = "Running", None
            actions.append(PostEvent("Normal", "RetryRequested", f"retrying from stage {name} ({token})"))
        else:
            actions.append(PostEvent("Normal", "RetryIgnored", f"retry {token!r} ignored: the run has not failed"))
    elif old.phase == "Failed" and old.stages:
        stages = list(old.stages)  # a failed run is final until retried; spec edits change nothing
    if old.phase == "Succeeded":
        stages = list(old.stages)  # a succeeded run is final

    if spec.storage.existing_claim is None and not observed.pvc_exists and old.phase != "Succeeded":
        actions.append(EnsurePVC(build_pvc(run.identity, spec)))

    current: str | None = None
    failure: tuple[str, str] | None = None
    finished: list[StageStatus] = []
    for i, listed in enumerate(stages):
        if listed.phase == "Skipped":
            continue
        job = jobs.get(listed.name)
        st = listed if job is None else _with_job(listed, job, ts)
        stages[i] = st
        if st.phase == "Succeeded":
            continue
        current = st.name
        if st.phase == "Failed":
            if job is not None and job.failed_condition:
                failure = _failure_message(st.name, job)
            elif st.reason == cond.START_TIMEOUT:  # the operator failed it (and, with Kueue, deleted its Job)
                failure = (cond.START_TIMEOUT, st.message or f"stage {st.name} failed")
            else:  # its Job is gone
                reason = cond.STAGE_LOST if job is None else (st.reason or cond.STAGE_FAILED)
                failure = (reason, st.message or f"stage {st.name} failed")
            break
        if job is None or st.name in waiting:
            if st.name not in waiting and any(s.name in jobs for s in stages[i + 1 :]):
                # A later stage's Job exists, so this stage succeeded before (its Job since deleted).
                stages[i] = st.model_copy(update={"phase": "Succeeded", "completion_time": st.completion_time or ts})
                continue
            if st.name not in waiting and not spec.suspend and old.phase not in ("Failed", "Succeeded"):
                cfg = build_config_map(run.identity, spec, st.name)
                job_manifest = build_job(run.identity, spec, st.name)
                actions.append(CreateJob(cfg, job_manifest))
                known = next((o for o in old.stages if o.name == st.name and o.phase == "Pending"), None)
                if known is None or known.job_name is None:
                    name = job_manifest["metadata"]["name"]
                    actions.append(PostEvent("Normal", "JobCreated", f"created Job {name} for stage {st.name}"))
                stages[i] = st.model_copy(update={"job_name": job_manifest["metadata"]["name"]})
            elif st.name not in waiting and spec.suspend and st.job_name:
                # Its Job existed and is gone: with Kueue, the run's suspend deleted it.
                stages[i] = st.model_copy(update={"phase": "Suspended", "reason": None, "message": None})
            break
        if job.deleting:
            if spec.suspend and job.queue:  # being deleted by the run's suspend: its Pod is stopping
                stages[i] = st.model_copy(update={"phase": "Suspended", "reason": None, "message": None})
            break
        if job.complete:
            # The stage's own word on success, when it says more than "done": whose output it reused, or
            # that it trained again and set the old output aside (docs/stage-protocol.md).
            said = job.result.message if job.result is not None and job.result.message != "done" else None
            update = {"phase": "Succeeded", "completion_time": job.completion_time or ts, "message": said}
            stages[i] = st.model_copy(update=update)
            finished.append(stages[i])
            continue
        if job.failed_condition:
            failure = _failure_message(st.name, job)
            stages[i] = st.model_copy(update={"phase": "Failed", "completion_time": ts, "message": failure[1]})
            finished.append(stages[i])
            break
        # The Job is live: make its suspension match the run's. Kueue owns a queued Job's suspend (it
        # would unsuspend an admitted Job the operator suspended), so the run's suspend deletes that
        # Job, keeping it until its Pod has stopped; resuming creates it again.
        if spec.suspend and job.queue:
            actions.append(DeleteJob(job.name, wait_for_pods=True))
            stages[i] = st.model_copy(update={"phase": "Suspended", "reason": None, "message": None})
            break
        if spec.suspend and not job.suspended:
            actions.append(SetJobSuspend(job.name, True))
        elif not spec.suspend and job.suspended and not job.queue:
            actions.append(SetJobSuspend(job.name, False))
        if not spec.suspend and job.suspended and job.queue:
            # Not admitted yet, or preempted: not running, not failing, and not on the start clock.
            stages[i] = _queued(st, job)
            break
        not_started = None if spec.suspend or job.suspended else job.waiting
        if not_started is not None:
            stages[i], timed_out = _pending(st, not_started, spec.runtime.start_timeout_seconds, now, ts)
            if timed_out:
                failure = (cond.START_TIMEOUT, stages[i].message or "")
                finished.append(stages[i])
                # Suspending deletes the Pod (and frees what it holds) but keeps the Job to inspect;
                # Kueue would unsuspend it, so a queued Job is deleted (which also frees its quota).
                actions.append(DeleteJob(job.name) if job.queue else SetJobSuspend(job.name, True))
            break
        if spec.suspend:
            phase = "Suspended"
        elif job.active or (st.phase in ("Running", "Suspended") and not job.suspended):
            phase = "Running"
        else:
            phase = "Pending"
        stages[i] = st.model_copy(update={"phase": phase, "reason": None, "message": None})
        break
    else:
        current = None

    status.stages = stages
    _summarise(run, status, current, failure, ts)
    actions += _events(run, old, status, ts)
    return Plan(actions=actions, status=status, finished=finished)


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
        c = cond.set_condition(c, cond.SUCCEEDED, "True", cond.PIPELINE_COMPLETED, msg, gen, ts)
    else:
        c = cond.set_condition(
            c, cond.SUCCEEDED, "False", cond.IN_PROGRESS, f"{len(done)}/{len(todo)} stages done", gen, ts
        )
    if failure is not None:
        c = cond.set_condition(c, cond.FAILED, "True", failure[0], failure[1], gen, ts)
    else:
        c = cond.set_condition(c, cond.FAILED, "False", cond.NO_FAILURE, "", gen, ts)
    status.conditions = c


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


def _events(run: RunView, old: RLHFRunStatus, new: RLHFRunStatus, ts: str) -> list[Action]:
    """One event per transition: of each stage's phase, of the run's phase, and of the spec while running."""
    out: list[Action] = []
    before = {s.name: s for s in old.stages}
    for st in new.stages:
        prev = before.get(st.name)
        stuck = st.phase == "Pending" and st.reason and st.reason not in STARTING_REASONS
        if stuck and (prev is None or prev.reason != st.reason):
            if st.reason == cond.QUEUED:
                out.append(PostEvent("Normal", "StageQueued", f"stage {st.name} is queued: {st.message}"))
            else:
                out.append(PostEvent("Warning", "StagePending", f"stage {st.name} cannot start: {st.message}"))
        if prev is not None and prev.phase == st.phase:
            continue
        if st.phase in STAGE_EVENTS:
            kind, reason = STAGE_EVENTS[st.phase]
            if st.phase == "Running" and prev is not None and prev.phase == "Suspended":
                reason = "StageResumed"
            out.append(PostEvent(kind, reason, st.message or f"stage {st.name} {st.phase.lower()}"))
    if new.phase != old.phase and new.phase in RUN_EVENTS and (run.status is not None or new.phase != "Pending"):
        kind, reason = RUN_EVENTS[new.phase]
        msg = next((c.message for c in new.conditions if c.type == cond.FAILED and c.status == "True"), "")
        out.append(PostEvent(kind, reason, msg or f"run {new.phase.lower()} ({new.progress or ''})"))
    seen = old.observed_generation
    if seen is not None and seen != run.generation and old.phase in ("Running", "Suspended", "Pending"):
        out.append(
            PostEvent("Normal", "SpecChanged", f"generation {run.generation}: applies to stages not started yet")
        )
    return out
