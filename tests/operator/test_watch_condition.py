"""A stage's reward-hacking findings become the RewardHackingSuspected condition, one event, and status."""

from __future__ import annotations

from datetime import UTC, datetime

from rlhf_api.layout import StageResult
from rlhf_api.run import RLHFRunSpec, RLHFRunStatus
from rlhf_operator.actions import PostEvent
from rlhf_operator.cli.cluster import render_status
from rlhf_operator.observe import JobObservation, Observed
from rlhf_operator.planner import RunView, plan

from .harness import tiny_run

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
FINDING = "rewardRiseWithCollapse at step 20: reward-model score -1.00 -> +2.00 while mean length 11.0 -> 4.0 tokens"


def view(status: RLHFRunStatus | None = None) -> RunView:
    spec = RLHFRunSpec.model_validate(tiny_run()["spec"], strict=False)
    return RunView("tiny", "ns", "uid-1", 1, spec, status, {})


def done(stage: str, findings: list[str] | None = None) -> JobObservation:
    result = StageResult(
        stage=stage,
        succeeded=True,
        step=20,
        total_steps=40,
        findings=findings or [],
        selected_step=10 if findings else None,
        selection="select: lastBeforeAlarm (the last evaluation before the alarm at step 20)" if findings else None,
    )
    return JobObservation(
        name=f"tiny-{stage}", stage=stage, uid=f"job-{stage}", complete=True, succeeded=1, result=result
    )


def condition(status: RLHFRunStatus) -> tuple[str, str, str] | None:
    c = next((c for c in status.conditions if c.type == "RewardHackingSuspected"), None)
    return (c.status, c.reason, c.message) if c else None


def events(actions: list) -> list[PostEvent]:
    return [a for a in actions if isinstance(a, PostEvent) and a.reason == "RewardHackingSuspected"]


def test_no_findings_no_condition_and_no_event() -> None:
    result = plan(view(), Observed({s: done(s) for s in ("sft", "reward", "ppo")}, True), NOW)
    assert condition(result.status) is None
    assert events(result.actions) == []


def test_findings_set_the_condition_with_the_evidence_and_the_kept_checkpoint_once() -> None:
    jobs = {"sft": done("sft"), "reward": done("reward"), "ppo": done("ppo", [FINDING])}
    first = plan(view(), Observed(jobs, True), NOW)
    status, reason, message = condition(first.status) or ("", "", "")
    assert (status, reason) == ("True", "DetectorFired")
    assert message.startswith(f"ppo: {FINDING}") and "(step 10: select: lastBeforeAlarm" in message
    ppo = next(s for s in first.status.stages if s.name == "ppo")
    assert ppo.findings == [FINDING]
    assert ppo.selection is not None and ppo.selection.startswith("step 10: select: lastBeforeAlarm")
    (event,) = events(first.actions)
    assert event.type == "Warning" and FINDING in event.message and "step 10" in event.message
    again = plan(view(first.status), Observed(jobs, True), NOW)  # same observation: no second event
    assert events(again.actions) == [] and condition(again.status) == condition(first.status)


def test_the_condition_turns_false_when_no_stage_carries_findings_any_more() -> None:
    jobs = {"sft": done("sft"), "reward": done("reward"), "ppo": done("ppo", [FINDING])}
    flagged = plan(view(), Observed(jobs, True), NOW).status
    cleared = flagged.model_copy(
        update={"stages": [s.model_copy(update={"findings": [], "selection": None}) for s in flagged.stages]}
    )
    again = plan(view(cleared), Observed({s: done(s) for s in ("sft", "reward", "ppo")}, True), NOW)
    assert condition(again.status) == ("False", "NoAlarm", "")


def test_rlhfctl_status_shows_the_alarm_and_the_kept_checkpoint() -> None:
    jobs = {"sft": done("sft"), "reward": done("reward"), "ppo": done("ppo", [FINDING])}
    status = plan(view(), Observed(jobs, True), NOW).status
    text = render_status("tiny", {"spec": {}, "status": status.to_wire()})
    assert f"ALARM {FINDING}" in text
    assert "output: step 10: select: lastBeforeAlarm" in text
    assert "RewardHackingSuspected=True DetectorFired" in text
