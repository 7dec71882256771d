"""A stage's reward-hacking findings become the RewardHackingSuspected condition, one event, and status."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rlhf_api.layout import StageResult, progress_log_line
from rlhf_api.run import RLHFRunSpec, RLHFRunStatus
from rlhf_api.watch import EvaluationRow
from rlhf_operator.actions import PostEvent
from rlhf_operator.cli.cluster import render_status
from rlhf_operator.observe import JobObservation, Observed, parse_progress_log
from rlhf_operator.planner import RunView, plan

from .harness import tiny_run

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
FINDING = "rewardRiseWithCollapse at step 20: reward-model score -1.00 -> +2.00 while mean length 11.0 -> 4.0 tokens"


ROWS = [
    EvaluationRow(step=0, score=-1.0, kl=0.0, length=11.0, distinct2=0.41, check_pass_rate=0.97),
    EvaluationRow(step=10, score=0.5, kl=2.5, length=9.5, distinct2=0.38, check_pass_rate=0.94, selected=True),
    EvaluationRow(step=20, score=2.0, kl=4.1, length=4.0, distinct2=0.2, check_pass_rate=0.5, alarm=True),
]


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
        evaluations=ROWS if findings else [],
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
    # no watch rows: no key, so statuses written before the field existed need no rewrite
    assert all("evaluations" not in st for st in result.status.to_wire()["stages"])


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
    ppo = next(s for s in status.stages if s.name == "ppo")
    assert ppo.evaluations == ROWS  # from the stage's result, nothing read besides it
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if "EVAL STEP" in line)
    assert lines[header].split() == ["EVAL", "STEP", "SCORE", "KL", "LENGTH", "DIST-2", "CHECKS"]  # no PREF-ACC
    assert lines[header + 2].split() == ["10", "+0.5", "2.5", "9.5", "0.38", "0.94", "<-", "output"]
    assert lines[header + 3].split() == ["20", "+2", "4.1", "4", "0.20", "0.50", "ALARM"]
    assert "RewardHackingSuspected=True DetectorFired" in text


def test_rlhfctl_run_local_prints_the_watch_under_the_stage(monkeypatch: Any, tmp_path: Path) -> None:
    from rlhf_api.run import RLHFRun
    from rlhf_operator.cli import local

    def finished(run: Any, stage: str, *rest: Any) -> local.StageRun:  # the stage's result file, no process
        result = done(stage, [FINDING] if stage == "ppo" else None).result
        assert result is not None
        return local.StageRun(stage, "Succeeded", 1.0, json.loads(result.model_dump_json(by_alias=True)))

    monkeypatch.setattr(local, "run_stage", finished)
    out = io.StringIO()
    local.run_pipeline(RLHFRun.model_validate(tiny_run(), strict=False), tmp_path, tmp_path, out=out)
    text = out.getvalue()
    ppo = text[text.index("ppo     Succeeded") :]
    assert f"ALARM {FINDING}" in ppo and "output: step 10: select: lastBeforeAlarm" in ppo
    assert "EVAL STEP" in ppo and "<- output" in ppo and text.count("EVAL STEP") == 1  # only the watched stage


def test_an_alarm_in_the_progress_sets_the_condition_while_the_stage_trains_and_the_result_adds_no_event() -> None:
    """Under ``action: warn`` a stage trains on for many steps after an alarm: the progress line the
    operator reads from the log carries the finding, so the condition and the event come now."""
    line = progress_log_line({"stage": "ppo", "step": 21, "totalSteps": 40, "metrics": {}, "findings": [FINDING]})
    progress = parse_progress_log(f"some log\n{line}\nmore log\n")
    assert progress is not None and progress.findings == (FINDING,)
    running = JobObservation(name="tiny-ppo", stage="ppo", uid="job-ppo", active=1, pods=1, progress=progress)
    jobs = {"sft": done("sft"), "reward": done("reward"), "ppo": running}
    live = plan(view(), Observed(jobs, True), NOW)
    ppo = next(s for s in live.status.stages if s.name == "ppo")
    assert ppo.phase == "Running" and ppo.findings == [FINDING]
    assert (condition(live.status) or ("",))[0] == "True"
    (event,) = events(live.actions)
    assert FINDING in event.message

    jobs["ppo"] = done("ppo", [FINDING, "klBeyondLimit at step 30: KL 9.1 > 6.0"])
    ended = plan(view(live.status), Observed(jobs, True), NOW)
    ppo = next(s for s in ended.status.stages if s.name == "ppo")
    assert ppo.findings == [FINDING, "klBeyondLimit at step 30: KL 9.1 > 6.0"]  # the result's, complete
    assert ppo.selection is not None and "step 10" in ppo.selection
    assert events(ended.actions) == []  # the same first finding: no second event
