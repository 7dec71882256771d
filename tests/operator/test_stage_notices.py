"""What a stage says on success reaches the run's status and the StageSucceeded event: whose output it
reused, or that it trained again and where the old output went (docs/stage-protocol.md)."""

from __future__ import annotations

from dataclasses import replace

from rlhf_operator.actions import PostEvent

from .test_planner import NOW, done, observed, plan, settle, view

TRAINED_AGAIN = (
    "done; warning: trained again: the previous ppo output (config hash 0123456789ab, finished "
    "2026-01-01T10:00:00Z) was made from other settings or inputs (spec.ppo.initKlCoef: 0.3 -> 0.1); it is "
    "kept, never read again, at runs/ns/tiny/superseded/ppo-20260101T110000Z (delete it when no longer needed)"
)


def _saying(stage: str, message: str):
    job = done(stage)
    assert job.result is not None
    return replace(job, result=job.result.model_copy(update={"message": message}))


def test_warning_and_reuse_are_in_the_status_and_the_event() -> None:
    reused = "already done: reused runs/ns/tiny/sft, written by an earlier run named tiny (uid uid-0), attempt 1"
    before = settle(view(), observed(_saying("sft", reused), done("reward")))
    step = plan(view(before), observed(_saying("sft", reused), done("reward"), _saying("ppo", TRAINED_AGAIN)), NOW)
    stages = {s.name: s for s in step.status.stages}
    assert stages["sft"].message == reused
    assert stages["reward"].message is None  # a plain "done" adds nothing
    assert stages["ppo"].phase == "Succeeded" and stages["ppo"].message == TRAINED_AGAIN
    events = [a.message for a in step.actions if isinstance(a, PostEvent) and a.reason == "StageSucceeded"]
    assert events == [TRAINED_AGAIN]


def test_the_last_stage_s_word_is_in_the_run_s_end_event() -> None:
    """The last stage's StageSucceeded is folded into RunSucceeded (one event per transition): what it
    said must not be lost there."""
    said = "done; warning: trained again: the ppo stage's output it was made from was replaced"
    before = settle(view(), observed(done("sft"), done("reward"), done("ppo")))
    step = plan(view(before), observed(done("sft"), done("reward"), done("ppo"), _saying("merge", said)), NOW)
    [event] = [a for a in step.actions if isinstance(a, PostEvent)]
    assert event.reason == "RunSucceeded" and event.message.startswith(f"stage merge succeeded: {said}; all stages")
