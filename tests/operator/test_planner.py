"""Table-driven tests of the pure planner: (spec, status, observed Jobs) -> (actions, status)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from rlhf_api.layout import StageResult
from rlhf_api.run import RLHFRunSpec, RLHFRunStatus, StageStatus
from rlhf_operator import children
from rlhf_operator.actions import CreateJob, DeleteJob, EnsurePVC, PostEvent, SetJobSuspend
from rlhf_operator.observe import JobObservation, Observed, Progress, Waiting
from rlhf_operator.planner import RETRY_ANNOTATION, RunView, plan

from .harness import tiny_run

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
PIPELINE = ("sft", "reward", "ppo", "merge")


# --- small builders ------------------------------------------------------------------------------
def spec(**changes: Any) -> RLHFRunSpec:
    return RLHFRunSpec.model_validate(tiny_run(**changes)["spec"], strict=False)


def view(
    status: RLHFRunStatus | None = None, generation: int = 1, annotations: dict | None = None, **spec_changes: Any
) -> RunView:
    return RunView("tiny", "ns", "uid-1", generation, spec(**spec_changes), status, annotations or {})


def job(stage: str, **kw: Any) -> JobObservation:
    return JobObservation(name=f"tiny-{stage}", stage=stage, uid=f"job-{stage}", **kw)


def done(stage: str, **metrics: float) -> JobObservation:
    result = StageResult(
        stage=stage, succeeded=True, step=10, total_steps=10, metrics=metrics, artifact_path=f"runs/ns/tiny/{stage}"
    )
    return job(
        stage,
        complete=True,
        succeeded=1,
        pods=1,
        result=result,
        start_time="2026-01-01T11:00:00Z",
        completion_time="2026-01-01T11:30:00Z",
    )


def running(stage: str, step: int = 0, total: int | None = None, **kw: Any) -> JobObservation:
    progress = Progress(step, total) if total else None
    fields: dict[str, Any] = {"active": 1, "pods": 1, "start_time": "2026-01-01T11:50:00Z", "progress": progress}
    return job(stage, **{**fields, **kw})


def failed(stage: str, reason: str = "BackoffLimitExceeded", exit_code: int = 1) -> JobObservation:
    result = StageResult(stage=stage, succeeded=False, message="corrupt", exit_code=exit_code)
    return job(stage, failed_condition=True, failed=2, pods=2, reason=reason, result=result, exit_code=exit_code)


def observed(*jobs: JobObservation, pvc: bool = True) -> Observed:
    return Observed({j.stage: j for j in jobs}, pvc)


def kinds(actions: list) -> list[str]:
    out = []
    for a in actions:
        if isinstance(a, PostEvent):
            out.append(f"Event:{a.reason}")
        elif isinstance(a, CreateJob | DeleteJob):
            out.append(f"{type(a).__name__}:{a.name}")
        elif isinstance(a, SetJobSuspend):
            out.append(f"Suspend:{a.name}={a.suspend}")
        else:
            out.append(type(a).__name__)
    return out


def settle(v: RunView, obs: Observed) -> RLHFRunStatus:
    """The status after one pass (as if written)."""
    return plan(v, obs, NOW).status


def cond(status: RLHFRunStatus, type_: str) -> tuple[str, str]:
    c = next(c for c in status.conditions if c.type == type_)
    return c.status, c.reason


RLAIF_SECTION = {
    "judge": {"path": "judge"},
    "constitution": ["Be kind."],
    "dataset": {"path": "p.jsonl", "format": "jsonl"},
}
# Method RLAIF: the labelling stage between SFT and what consumes its pairs (reward -> PPO, or DPO).
RLAIF_THEN_PPO = {"method": "RLAIF", "rlaif": RLAIF_SECTION, "reward": {"promptTemplate": "{prompt}"}}
RLAIF_THEN_DPO = {"method": "RLAIF", "rlaif": {**RLAIF_SECTION, "then": "DPO"}, "dpo": {}, "reward": None, "ppo": None}

# --- the table -------------------------------------------------------------------------------------
CASES = [
    # (id, run view kwargs, observed jobs, expected action kinds (events omitted), phase, current stage)
    (
        "new run creates PVC and the first Job",
        {},
        observed(pvc=False),
        ["EnsurePVC", "CreateJob:tiny-sft"],
        "Pending",
        "sft",
    ),
    (
        "existing claim: no PVC",
        {"storage": {"existingClaim": "data"}},
        observed(pvc=False),
        ["CreateJob:tiny-sft"],
        "Pending",
        "sft",
    ),
    ("first stage running", {}, observed(running("sft", 3, 10)), [], "Running", "sft"),
    ("stage done: next Job", {}, observed(done("sft")), ["CreateJob:tiny-reward"], "Running", "reward"),
    ("never two Jobs at once", {}, observed(done("sft"), running("reward")), [], "Running", "reward"),
    ("all done", {}, observed(*(done(s) for s in PIPELINE)), [], "Succeeded", None),
    ("failure ends the run", {}, observed(done("sft"), failed("reward")), [], "Failed", "reward"),
    (
        "suspend suspends the live Job",
        {"suspend": True},
        observed(running("sft")),
        ["Suspend:tiny-sft=True"],
        "Suspended",
        "sft",
    ),
    ("suspended run creates no Job", {"suspend": True}, observed(done("sft")), [], "Suspended", "reward"),
    (
        "resume unsuspends",
        {},
        observed(running("sft", suspended=True, active=0)),
        ["Suspend:tiny-sft=False"],
        "Pending",
        "sft",
    ),  # Running again once its new pod starts
    (
        "Kueue admits: operator leaves suspend alone",
        {"runtime": {"queueName": "gpu"}},
        observed(job("sft", suspended=True, queue="gpu")),
        [],
        "Pending",
        "sft",
    ),
    ("later Job proves an earlier stage (TTL'd Job)", {}, observed(running("reward")), [], "Running", "reward"),
    ("RLAIF labels after SFT", RLAIF_THEN_PPO, observed(done("sft")), ["CreateJob:tiny-rlaif"], "Running", "rlaif"),
    (
        "RLAIF then PPO: reward model on the labels",
        RLAIF_THEN_PPO,
        observed(done("sft"), done("rlaif")),
        ["CreateJob:tiny-reward"],
        "Running",
        "reward",
    ),
    (
        "RLAIF then DPO: DPO on the labels",
        RLAIF_THEN_DPO,
        observed(done("sft"), done("rlaif")),
        ["CreateJob:tiny-dpo"],
        "Running",
        "dpo",
    ),
    (
        "RLAIF then DPO: done after merge",
        RLAIF_THEN_DPO,
        observed(*(done(s) for s in ("sft", "rlaif", "dpo", "merge"))),
        [],
        "Succeeded",
        None,
    ),
    (
        "disabled stage skipped",
        {"sft": {**tiny_run()["spec"]["sft"], "enabled": False}},
        observed(),
        ["CreateJob:tiny-reward"],
        "Pending",
        "reward",
    ),
]


@pytest.mark.parametrize(("case", "kw", "obs", "want", "phase", "current"), CASES, ids=[c[0] for c in CASES])
def test_plan(case: str, kw: dict, obs: Observed, want: list[str], phase: str, current: str | None) -> None:
    result = plan(view(**kw), obs, NOW)
    assert [k for k in kinds(result.actions) if not k.startswith("Event:")] == want
    assert result.status.phase == phase
    assert result.status.current_stage == current


def test_plan_is_a_fixed_point() -> None:
    """Planning again over its own status changes nothing and does nothing (re-apply, missed events)."""
    for _, kw, obs, *_ in CASES:
        first = plan(view(**kw), obs, NOW)
        again = plan(view(first.status, **kw), obs, NOW.replace(minute=5))
        assert again.status == first.status
        assert [a for a in again.actions if not isinstance(a, CreateJob | EnsurePVC | SetJobSuspend)] == []


def test_job_creation_is_repeated_until_observed_never_doubled() -> None:
    """A lost status write just repeats the same deterministic create (an AlreadyExists)."""
    one = plan(view(), observed(), NOW)
    two = plan(view(one.status), observed(), NOW)
    assert [a.job for a in two.actions if isinstance(a, CreateJob)] == [
        a.job for a in one.actions if isinstance(a, CreateJob)
    ]


def test_conditions_failure_reason_and_message() -> None:
    status = settle(view(), observed(done("sft"), failed("reward")))
    assert cond(status, "Failed") == ("True", "BackoffLimitExceeded")
    assert cond(status, "Running") == ("False", "RunFinished")
    message = next(c.message for c in status.conditions if c.type == "Failed")
    assert "stage reward" in message and "corrupt" in message
    config = settle(view(), observed(failed("sft", reason="PodFailurePolicy", exit_code=2)))
    assert cond(config, "Failed") == ("True", "ConfigError")


def test_conditions_present_from_first_visit_with_generation() -> None:
    status = settle(view(generation=3), observed(pvc=False))
    assert {c.type for c in status.conditions} == {"Running", "Suspended", "Succeeded", "Failed"}
    assert all(c.observed_generation == 3 for c in status.conditions)
    assert cond(status, "Running") == ("Unknown", "StagePending")


def test_transition_time_moves_only_with_status() -> None:
    first = settle(view(), observed(running("sft")))
    later = plan(view(first), observed(running("sft", 5, 10)), NOW.replace(hour=13)).status
    t0 = {c.type: c.last_transition_time for c in first.conditions}
    assert {c.type: c.last_transition_time for c in later.conditions} == t0


def test_progress_eta_reward_and_summary() -> None:
    status = settle(view(), observed(done("sft"), done("reward"), running("ppo", 4, 10)))
    ppo = next(s for s in status.stages if s.name == "ppo")
    assert ppo.progress is not None and ppo.progress.percent == 40
    assert ppo.progress.eta_seconds == 900  # 10 minutes for 4 steps -> 15 minutes for 6
    assert status.progress == "2/4 ppo 40%"
    final = settle(view(status), observed(done("sft"), done("reward"), done("ppo", reward_mean=0.5), done("merge")))
    assert final.reward == 0.5 and final.output_model == "runs/ns/tiny/merge/model"
    assert next(s for s in final.stages if s.name == "ppo").metrics == {"reward_mean": 0.5}


def _events(p: Any) -> list[tuple[str, str]]:
    return [(a.reason, a.message) for a in p.actions if isinstance(a, PostEvent)]


def test_one_event_per_transition() -> None:
    """Issue 14: each transition of a run is told by one event, enough for `kubectl describe` to tell
    the story (a stage started, succeeded, the run's end), and a pass that changes nothing tells nothing."""
    created = plan(view(), observed(), NOW)
    assert _events(created) == []  # the Job's creation: its start is told when its Pod runs
    first = plan(view(created.status), observed(running("sft")), NOW)
    assert _events(first) == [("StageStarted", "stage sft running")]  # not also RunRunning
    second = plan(view(first.status), observed(done("sft")), NOW)
    assert kinds(second.actions) == ["CreateJob:tiny-reward", "Event:StageSucceeded"]  # no JobCreated
    quiet = plan(view(second.status), observed(done("sft"), running("reward")), NOW)
    assert _events(quiet) == [("StageStarted", "stage reward running")]
    status = settle(view(quiet.status), observed(done("sft"), done("reward"), done("ppo"), running("merge")))
    last = plan(view(status), observed(*(done(s) for s in PIPELINE)), NOW)
    # The last stage's success and the run's are one event.
    assert _events(last) == [
        ("RunSucceeded", "stage merge succeeded; all stages succeeded; output model runs/ns/tiny/merge/model")
    ]
    assert _events(plan(view(last.status), observed(*(done(s) for s in PIPELINE)), NOW)) == []


def test_a_failed_stage_and_the_failed_run_are_one_warning() -> None:
    status = settle(view(), observed(done("sft"), running("reward")))
    p = plan(view(status), observed(done("sft"), failed("reward")), NOW)
    [(reason, message)] = _events(p)
    assert reason == "RunFailed" and message.startswith("stage reward failed (BackoffLimitExceeded, exit code 1)")
    assert [a.type for a in p.actions if isinstance(a, PostEvent)] == ["Warning"]


def test_retry_deletes_the_failed_job_then_recreates_it() -> None:
    failed_status = settle(view(), observed(done("sft"), failed("reward")))
    annotations = {RETRY_ANNOTATION: "1"}
    retry = plan(view(failed_status, annotations=annotations), observed(done("sft"), failed("reward")), NOW)
    assert [k for k in kinds(retry.actions) if not k.startswith("Event:Stage")] == [
        "DeleteJob:tiny-reward",
        "Event:RetryRequested",  # it tells the run's restart: no RunRunning besides
    ]
    assert retry.status.phase == "Running" and retry.status.retry_token == "1"
    nxt = plan(view(retry.status, annotations=annotations), observed(done("sft")), NOW)
    assert kinds(nxt.actions)[:1] == ["CreateJob:tiny-reward"]
    # The same token again is not a new retry.
    again = plan(view(nxt.status, annotations=annotations), observed(done("sft"), running("reward")), NOW)
    assert not any(isinstance(a, DeleteJob) for a in again.actions)


def test_failed_run_is_final_without_retry() -> None:
    failed_status = settle(view(), observed(done("sft"), failed("reward")))
    gone = plan(view(failed_status), observed(done("sft")), NOW)  # the failed Job was TTL-deleted
    assert not any(isinstance(a, CreateJob) for a in gone.actions)
    assert gone.status.phase == "Failed"


def test_spec_edit_while_running_applies_to_later_stages() -> None:
    status = settle(view(), observed(running("sft")))
    edited = plan(view(status, generation=2, runtime={"backoffLimit": 5}), observed(running("sft")), NOW)
    assert "Event:SpecChanged" in kinds(edited.actions)
    assert not any(isinstance(a, CreateJob | DeleteJob) for a in edited.actions)  # the running Job is kept
    later = plan(view(edited.status, generation=2, runtime={"backoffLimit": 5}), observed(done("sft")), NOW)
    create = next(a for a in later.actions if isinstance(a, CreateJob))
    assert create.job["spec"]["backoffLimit"] == 5
    assert edited.status.observed_generation == 2


def test_stage_entries_keep_history() -> None:
    status = settle(view(), observed(done("sft", loss=0.1)))
    sft = next(s for s in status.stages if s.name == "sft")
    assert sft == StageStatus(
        name="sft",
        phase="Succeeded",
        job_name="tiny-sft",
        attempts=1,
        start_time="2026-01-01T11:00:00Z",
        completion_time="2026-01-01T11:30:00Z",
        progress=sft.progress,
        metrics={"loss": 0.1},
        artifact_path="runs/ns/tiny/sft",
    )


# --- a Pod that cannot start is Pending, not Running ---------------------------------------------
def pulling(since: str = "2026-01-01T11:55:00Z", reason: str = "ImagePullBackOff") -> JobObservation:
    waiting = Waiting(reason, 'Back-off pulling image "nope:1"', since)
    return running("sft", waiting=waiting)


def test_a_pod_that_cannot_start_is_pending_with_its_reason_and_one_event() -> None:
    p = plan(view(), observed(pulling()), NOW)
    sft = p.status.stages[0]
    assert (sft.phase, sft.reason) == ("Pending", "ImagePullBackOff")
    assert sft.message is not None and "nope:1" in sft.message
    assert p.status.phase == "Pending"
    running_condition = next(c for c in p.status.conditions if c.type == "Running")
    assert running_condition.status == "Unknown" and "nope:1" in running_condition.message
    assert "Event:StagePending" in kinds(p.actions)
    again = plan(view(p.status), observed(pulling()), NOW)
    assert "Event:StagePending" not in kinds(again.actions), "one event per reason, not per pass"
    assert again.status == p.status


def test_starting_reasons_are_pending_without_a_warning() -> None:
    p = plan(view(), observed(pulling(reason="ContainerCreating")), NOW)
    assert p.status.stages[0].phase == "Pending"
    assert "Event:StagePending" not in kinds(p.actions)


def test_the_steps_of_a_normal_start_rewrite_no_status() -> None:
    # Writes of a start: the Job's creation and its Pod running; its Pod's appearance (attempts,
    # startTime) is recorded with the Pod running (issue 14: writes per transition).
    created = plan(view(), observed(), NOW)
    assert "CreateJob:tiny-sft" in kinds(created.actions)
    sft = created.status.stages[0]
    assert (sft.phase, sft.reason) == ("Pending", "Starting")
    assert plan(view(created.status), observed(job("sft")), NOW).status == created.status, "the Job, no Pod yet"
    scheduling = plan(view(created.status), observed(pulling(reason="Scheduling")), NOW)
    assert scheduling.status == created.status, "the Pod seen"
    ran = plan(view(scheduling.status), observed(running("sft")), NOW).status.stages[0]
    assert (ran.phase, ran.attempts, ran.start_time) == ("Running", 1, "2026-01-01T11:50:00Z")
    for step in ("ContainerCreating", "PodInitializing"):
        again = plan(view(scheduling.status), observed(pulling(reason=step)), NOW)
        assert again.status == scheduling.status, f"{step} rewrote the status"
        assert not [k for k in kinds(again.actions) if k.startswith("Event:")], step
    late = pulling(since="2026-01-01T00:00:00Z", reason="ContainerCreating")
    failed = plan(view(scheduling.status), observed(late), NOW).status.stages[0]
    assert failed.phase == "Failed" and failed.message is not None and "ContainerCreating" in failed.message


def test_a_pod_that_started_clears_the_waiting_reason() -> None:
    first = plan(view(), observed(pulling()), NOW)
    p = plan(view(first.status), observed(running("sft")), NOW)
    sft = p.status.stages[0]
    assert (sft.phase, sft.reason, sft.message) == ("Running", None, None)


def test_waiting_past_the_start_timeout_fails_the_run_and_suspends_the_job() -> None:
    old = pulling(since="2026-01-01T11:00:00Z")  # an hour ago; the default timeout is 900 s
    p = plan(view(), observed(old), NOW)
    sft = p.status.stages[0]
    assert (sft.phase, sft.reason) == ("Failed", "StartTimeout")
    assert p.status.phase == "Failed"
    failed_condition = next(c for c in p.status.conditions if c.type == "Failed")
    assert failed_condition.reason == "StartTimeout" and "ImagePullBackOff" in failed_condition.message
    assert "Suspend:tiny-sft=True" in kinds(p.actions)
    # The next pass sees the suspended Job: the failure and its reason stand, nothing more happens.
    later = plan(view(p.status), observed(running("sft", suspended=True, active=0)), NOW)
    assert later.status.phase == "Failed" and later.status.stages[0].reason == "StartTimeout"
    assert later.actions == []


def test_start_timeout_null_waits_for_ever() -> None:
    p = plan(view(runtime={"startTimeoutSeconds": None}), observed(pulling(since="2025-01-01T00:00:00Z")), NOW)
    assert p.status.stages[0].phase == "Pending"


# --- Kueue (runtime.queueName): Kueue owns the Job's suspend ---------------------------------------
KUEUE = {"runtime": {"queueName": "gpu"}}


def queued(stage: str = "sft", **kw: Any) -> JobObservation:
    return job(stage, **{"suspended": True, "queue": "gpu", **kw})


def test_a_job_kueue_has_not_admitted_is_queued_not_running_and_not_on_the_start_clock() -> None:
    p = plan(view(**KUEUE), observed(queued()), NOW)
    sft = p.status.stages[0]
    assert (sft.phase, sft.reason) == ("Pending", "Queued")
    assert sft.message is not None and "LocalQueue gpu" in sft.message and "tiny-sft" in sft.message
    assert p.status.phase == "Pending"
    assert cond(p.status, "Running") == ("Unknown", "StagePending")
    assert kinds(p.actions) == ["Event:StageQueued"], "queueing is normal: no StagePending warning, no patch"
    # Queued for a day: no StartTimeout (the start clock runs from the admitted Job's Pod).
    later = plan(view(p.status, **KUEUE), observed(queued()), datetime(2026, 1, 2, 12, 0, tzinfo=UTC))
    assert later.status.phase == "Pending" and later.actions == []


def test_admitted_then_running() -> None:
    first = plan(view(**KUEUE), observed(queued()), NOW)
    admitted = plan(view(first.status, **KUEUE), observed(running("sft", queue="gpu")), NOW)
    sft = admitted.status.stages[0]
    assert (sft.phase, sft.reason, sft.message) == ("Running", None, None)
    assert admitted.status.phase == "Running"
    assert "Event:StageStarted" in kinds(admitted.actions)


def test_suspend_deletes_a_queued_job_and_waits_for_its_pod_then_resume_creates_it_again() -> None:
    start = plan(view(**KUEUE), observed(running("sft", queue="gpu")), NOW).status
    p = plan(view(start, suspend=True, **KUEUE), observed(running("sft", queue="gpu")), NOW)
    deletes = [a for a in p.actions if isinstance(a, DeleteJob)]
    assert deletes == [DeleteJob("tiny-sft", wait_for_pods=True)], "never patch spec.suspend: Kueue would undo it"
    assert not any(isinstance(a, SetJobSuspend) for a in p.actions)
    assert p.status.phase == "Suspended" and p.status.stages[0].phase == "Suspended"
    # While the Pod stops (foreground deletion), and once the Job is gone: Suspended, nothing more to do.
    stopping = plan(view(p.status, suspend=True, **KUEUE), observed(running("sft", queue="gpu", deleting=True)), NOW)
    assert stopping.actions == [] and stopping.status.stages[0].phase == "Suspended"
    gone = plan(view(stopping.status, suspend=True, **KUEUE), observed(), NOW)
    assert gone.actions == [] and gone.status.stages[0].phase == "Suspended"
    assert gone.status.phase == "Suspended" and gone.status.stages[0].job_name == "tiny-sft"
    # Resume: the Job is created again (suspended, labelled), and queues.
    resumed = plan(view(gone.status, **KUEUE), observed(), NOW)
    creates = [a for a in resumed.actions if isinstance(a, CreateJob)]
    assert [c.name for c in creates] == ["tiny-sft"]
    assert creates[0].job["spec"]["suspend"] is True
    assert creates[0].job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu"
    again = plan(view(resumed.status, **KUEUE), observed(queued(pods=0)), NOW)
    sft = again.status.stages[0]
    assert (sft.phase, sft.reason) == ("Pending", "Queued")
    assert sft.message is not None and "resumes from its last checkpoint" in sft.message


def test_suspend_of_a_queued_job_that_never_ran_deletes_it_too() -> None:
    first = plan(view(**KUEUE), observed(queued()), NOW)
    p = plan(view(first.status, suspend=True, **KUEUE), observed(queued()), NOW)
    assert [a for a in p.actions if isinstance(a, DeleteJob)] == [DeleteJob("tiny-sft", wait_for_pods=True)]
    assert p.status.phase == "Suspended"


def test_kueue_preempting_a_running_stage_is_queued_not_failed() -> None:
    """Kueue suspends the Job to preempt it: the stage waits to be admitted again, the run does not fail."""
    start = plan(view(**KUEUE), observed(running("sft", 5, 10, queue="gpu")), NOW).status
    p = plan(view(start, **KUEUE), observed(queued(active=0, pods=1)), NOW)
    sft = p.status.stages[0]
    assert (sft.phase, sft.reason) == ("Pending", "Queued")
    assert sft.message is not None and "resumes from its last checkpoint" in sft.message
    assert p.status.phase == "Running", "the run goes on; it is not Failed"
    assert not any(isinstance(a, SetJobSuspend | DeleteJob) for a in p.actions)
    assert cond(p.status, "Failed") == ("False", "NoFailure")
    readmitted = plan(view(p.status, **KUEUE), observed(running("sft", 6, 10, queue="gpu", pods=2)), NOW)
    assert readmitted.status.stages[0].phase == "Running"


def test_a_job_without_the_queue_label_is_unsuspended_even_if_the_spec_names_a_queue_now() -> None:
    """runtime.queueName added while a stage's Job (created without it) is suspended: that Job is not Kueue's."""
    p = plan(view(**KUEUE), observed(running("sft", suspended=True, active=0)), NOW)
    assert "Suspend:tiny-sft=False" in kinds(p.actions)


def test_start_timeout_of_a_queued_job_deletes_it_and_keeps_the_reason() -> None:
    """Kueue would unsuspend an admitted Job the operator suspends, so the timed-out Job is deleted."""
    stuck = running("sft", queue="gpu", waiting=Waiting("ImagePullBackOff", "no", "2026-01-01T11:00:00Z"))
    p = plan(view(**KUEUE), observed(stuck), NOW)
    assert [a for a in p.actions if isinstance(a, DeleteJob)] == [DeleteJob("tiny-sft")]
    assert not any(isinstance(a, SetJobSuspend) for a in p.actions)
    assert p.status.phase == "Failed"
    later = plan(view(p.status, **KUEUE), observed(), NOW)
    assert later.status.phase == "Failed" and later.actions == []
    assert cond(later.status, "Failed") == ("True", "StartTimeout"), "not StageLost: the operator deleted it"


def test_a_config_too_large_for_the_job_fails_the_stage_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage config rides on its Job's annotation (256 KiB in all): one the API server would refuse
    on every pass fails the stage, with the size and the fix, and no Job is attempted."""
    monkeypatch.setattr(children, "STAGE_CONFIG_LIMIT", 1024)
    p = plan(view(), observed(), NOW)
    assert not [a for a in p.actions if isinstance(a, CreateJob)]
    sft = p.status.stages[0]
    assert (sft.phase, sft.reason, p.status.phase) == ("Failed", "ConfigTooLarge", "Failed")
    assert sft.message is not None and "above the 1 KiB" in sft.message and "shorten the run's spec" in sft.message
    assert cond(p.status, "Failed") == ("True", "ConfigTooLarge")
    again = plan(view(p.status), observed(), NOW)  # no Job, ever: still this reason, nothing to write
    assert again.status == p.status and again.actions == []


def test_a_pod_that_ended_before_its_job_writes_nothing_until_the_job_ends() -> None:
    """The Pod's termination message comes a moment before the Job controller marks the Job Complete:
    folding it in then would be a second status write for one transition (issue 14)."""
    running_status = settle(view(), observed(running("sft")))
    ended_pod = JobObservation(**{**vars(running("sft")), "result": done("sft").result})
    assert plan(view(running_status), observed(ended_pod), NOW).status == running_status
    finished = plan(view(running_status), observed(done("sft")), NOW).status.stages[0]
    assert (finished.phase, finished.artifact_path) == ("Succeeded", "runs/ns/tiny/sft")
