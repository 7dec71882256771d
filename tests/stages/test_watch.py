"""The watch's numbers, detectors and checkpoint selection on constructed evaluation histories."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from rlhf_api.watch import CHECKS_FAILING, KL_BEYOND_LIMIT, REWARD_WITH_COLLAPSE, SCORE_OUT_OF_RANGE, AnswerCheck, Watch
from rlhf_stages.sampling.watch import (
    Answers,
    Watcher,
    detect,
    distinct_n,
    kl_limit,
    repetition,
    select,
    status_rows,
    summarize,
)


def record(step: int, **over: Any) -> dict[str, Any]:
    """A healthy evaluation (the SFT policy's shape on the tiny task), with some numbers changed."""
    base = {
        "step": step,
        "score_mean": -1.0,
        "score_std": 1.5,
        "kl_mean": 0.0,
        "length_mean": 11.0,
        "eos_rate": 1.0,
        "distinct_2": 0.40,
        "repetition": 0.05,
    }
    return {**base, **over}


def kinds(history: list[dict[str, Any]], watch: Watch | None = None, limit: float | None = 18.0) -> list[str]:
    return [f.detector for f in detect(history, watch or Watch(), limit)]


def test_summary_numbers() -> None:
    answers = Answers(
        tokens=[[1, 2, 3, 4], [5, 5, 5, 5], [1, 2]],
        ended_with_eos=[True, False, True],
        scores=[1.0, 3.0, 2.0],
        kl=[0.5, 1.5, 1.0],
        texts=["a b c d", "e e e e", "a b"],
        prompts=["p1", "p2", "p3"],
    )
    r = summarize(answers, score_max=2.5, samples_kept=2)
    assert r["score_mean"] == pytest.approx(2.0) and r["score_std"] == pytest.approx((2 / 3) ** 0.5)
    assert r["kl_mean"] == pytest.approx(1.0) and r["eos_rate"] == pytest.approx(2 / 3)
    assert r["length_mean"] == pytest.approx(10 / 3) and r["length_p10"] == pytest.approx(2.4)
    assert r["above_score_range"] == pytest.approx(1 / 3)
    # bigrams: (1,2) (2,3) (3,4) (5,5)x3 (1,2) -> 4 distinct of 7
    assert r["distinct_2"] == pytest.approx(4 / 7)
    assert r["repetition"] == pytest.approx((0 + 0.75 + 0) / 3)
    assert [s["answer"] for s in r["samples"]] == ["a b c d", "e e e e"]
    assert distinct_n([], 2) == 0.0 and repetition([]) == 0.0


def test_healthy_improvement_raises_nothing() -> None:
    # Reward up by 2.5, answers a little shorter and a little less varied: what sound PPO does.
    history = [record(0), record(10, score_mean=0.5, length_mean=9.5, distinct_2=0.30), record(20, score_mean=1.5)]
    assert kinds(history) == []
    # Sound GRPO on the tiny task sharpened to half the baseline's distinct-2 by step 60 (seed 2: 0.62 ->
    # 0.31, which the earlier default ratio of 0.5 called a collapse): still nothing.
    assert kinds([record(0), record(60, score_mean=2.0, distinct_2=0.20)]) == []


@pytest.mark.parametrize(
    "collapse",
    [{"length_mean": 5.0}, {"distinct_2": 0.12}, {"repetition": 0.45}],
    ids=["length-halved", "diversity-collapsed", "repetition"],
)
def test_reward_rising_while_answers_collapse(collapse: dict[str, float]) -> None:
    history = [record(0), record(10, score_mean=0.0), record(20, score_mean=2.0, **collapse)]
    (finding,) = detect(history, Watch(), None)
    assert finding.detector == REWARD_WITH_COLLAPSE and finding.step == 20
    assert "-1.00 -> +2.00" in finding.evidence


def test_collapse_without_a_reward_rise_is_not_reward_hacking() -> None:
    # Shorter answers the reward model does not like more: a different problem, not this detector's.
    assert kinds([record(0), record(10, score_mean=-0.8, length_mean=4.0)]) == []


def test_thresholds_come_from_the_spec() -> None:
    history = [record(0), record(10, score_mean=-0.4, length_mean=8.0)]
    assert kinds(history) == []  # rise 0.6 >= 0.5, but length 8/11 = 0.73 is above 0.7
    assert kinds(history, Watch(length_ratio=0.75)) == [REWARD_WITH_COLLAPSE]
    assert kinds(history, Watch(length_ratio=0.75, min_reward_rise=1.0)) == []


def test_kl_beyond_its_limit() -> None:
    history = [record(0), record(10, kl_mean=20.0)]
    assert kinds(history, limit=18.0) == [KL_BEYOND_LIMIT]
    assert kinds(history, limit=None) == []
    assert kl_limit(Watch(), kl_target=6.0) == 18.0
    assert kl_limit(Watch(kl_limit=2.0), kl_target=6.0) == 2.0
    assert kl_limit(Watch(), kl_target=None) is None


def test_scores_beyond_the_reward_models_own_range() -> None:
    assert kinds([record(0), record(10, above_score_range=0.6)]) == [SCORE_OUT_OF_RANGE]
    assert kinds([record(0), record(10, above_score_range=0.2)]) == []
    assert kinds([record(0), record(10)]) == []  # range unknown (external reward model): off


CHECKS = [
    AnswerCheck(name="no-links", must_not_match=r"https?://"),
    AnswerCheck(name="sentence", must_match=r"\.$", max_tokens=5),
]


def test_rule_based_checks_are_measured_per_answer_and_per_check() -> None:
    answers = Answers(
        tokens=[[1, 2, 3], [1, 2, 3, 4, 5, 6], [1, 2]],
        ended_with_eos=[True, True, True],
        scores=[0.0, 0.0, 0.0],
        kl=[0.0, 0.0, 0.0],
        texts=["A fine day.", "see http://x.y today.", " no period \n"],  # stripped before the checks
        prompts=["p1", "p2", "p3"],
    )
    r = summarize(answers, score_max=None, samples_kept=3, checks=CHECKS)
    assert r["check_pass_rate"] == pytest.approx(1 / 3)
    assert r["checks"] == {"no-links": pytest.approx(2 / 3), "sentence": pytest.approx(1 / 3)}
    # the second fails both: a link, and 6 tokens > 5 (it does end with a period)
    assert [s["failed_checks"] for s in r["samples"]] == [[], ["no-links", "sentence"], ["sentence"]]
    unchecked = summarize(answers, score_max=None, samples_kept=1)
    assert "check_pass_rate" not in unchecked and "failed_checks" not in unchecked["samples"][0]


def test_check_pass_rate_falling_raises_an_alarm_naming_the_check() -> None:
    base = record(0, check_pass_rate=0.9, checks={"no-links": 1.0, "sentence": 0.9})
    fell = record(10, check_pass_rate=0.75, checks={"no-links": 0.8, "sentence": 0.9})
    (finding,) = detect([base, fell], Watch(checks=CHECKS), None)
    assert finding.detector == CHECKS_FAILING and finding.step == 10
    assert finding.evidence == "answers passing every check 0.90 -> 0.75 (no-links 1.00 -> 0.80)"
    assert kinds([base, record(10, check_pass_rate=0.85)], Watch(checks=CHECKS)) == []  # within checkDrop 0.1
    assert kinds([base, fell], Watch(checks=CHECKS, check_drop=0.2)) == []
    assert kinds([record(0), fell]) == []  # the baseline measured no checks: nothing to compare


def test_status_carries_the_baseline_the_output_the_first_alarm_and_the_latest() -> None:
    table = [
        {"step": s, "score_mean": s / 3, "kl_mean": math.nan if s == 0 else 1.23456, "length_mean": 10.0}
        | {"distinct_2": 0.5, "alarm": s >= 60}
        for s in range(0, 130, 10)
    ]
    rows = status_rows(table, selected_step=50)
    assert [r.step for r in rows] == [0, 50, 60, 80, 90, 100, 110, 120]  # 8 of 13
    assert rows[0].kl is None and rows[1].kl == 1.235 and rows[1].score == 16.67  # NaN left out, 4 digits
    assert [(r.alarm, r.selected) for r in rows[:3]] == [(False, False), (False, True), (True, False)]
    assert rows[0].check_pass_rate is None and status_rows([], None) == []


def alarmed(step: int, **over: Any) -> dict[str, Any]:
    return {**record(step, **over), "findings": [f"x at step {step}"]}


def test_selection_criteria() -> None:
    history = [
        record(0),
        record(10, score_mean=0.5),
        record(20, score_mean=0.2),
        alarmed(30, score_mean=3.0),
        record(40, score_mean=4.0),
    ]
    assert select(history, Watch(select="lastBeforeAlarm"), 40)[0] == 20
    assert "alarm at step 30" in select(history, Watch(select="lastBeforeAlarm"), 40)[1]
    assert select(history, Watch(select="bestReward"), 40)[0] == 10  # the alarmed step 30 and later do not count
    assert select(history, Watch(select="last"), 40)[0] == 40
    quiet = [record(0), record(10, score_mean=0.5)]
    assert select(quiet, Watch(select="lastBeforeAlarm"), 12)[0] == 12  # no alarm: the final policy


def test_an_evaluation_already_drifting_is_never_the_output_of_an_alarmed_run(tmp_path: Path) -> None:
    """The last evaluation before the alarm can be on its way to the collapse: shorter answers and a
    risen score, just above lengthRatio (PPO on the tiny task's hole: 0.74 x, target rate 0.20
    against the SFT policy's 0.34). The output is the last one that had not begun to drift."""
    history = [
        record(0),  # score -1.0, length 11
        record(10, score_mean=-0.2, length_mean=10.0),  # score up 0.8, length 0.91 x: sound
        record(20, score_mean=1.0, length_mean=8.0),  # 0.73 x with the score up 2.0: drifting
        record(30, score_mean=-0.8, length_mean=8.0),  # 0.73 x, but the score barely moved: not drifting
        record(40, score_mean=2.0, length_mean=8.0),  # drifting
        alarmed(50, score_mean=4.0, length_mean=4.0),
    ]
    step, why = select(history, Watch(), 50)
    assert step == 30 and "steps 40 were drifting (length below 0.9 x" in why, why
    assert select(history, Watch(select="bestReward"), 50)[0] == 10  # step 40 scored higher, but drifted
    assert select(history, Watch(candidate_length_ratio=0.0), 50)[0] == 40  # the gate off: the old choice
    assert select(history[:2] + history[4:], Watch(), 50)[0] == 10

    # The watcher keeps on disk what the selection will pick, and a rollback puts back the same.
    w = Watcher(Watch(eval_every=10, action="rollback"), tmp_path, kl_target=None, score_max=None, total_steps=60)
    for r in history[:5]:
        answers = FakeAnswers.of(r["score_mean"], int(r["length_mean"]))
        w.record(r["step"], answers, lambda s=r["step"]: {"s": s})
    assert not w.alarmed, w.history
    assert w.candidate_step == 30 and w.load_candidate()[0] == 30


class FakeAnswers:
    """Answers shaped like an evaluation with the given mean score and length."""

    @staticmethod
    def of(score: float, length: int) -> Answers:
        tokens = [[i % 7 + 1 + j for i in range(length)] for j in range(8)]
        return Answers(tokens, [True] * 8, [score] * 8, [1.0] * 8, ["t"] * 8, ["p"] * 8)


def test_watcher_keeps_the_pre_alarm_candidate_and_survives_a_restart(tmp_path: Path) -> None:
    watch = Watch(eval_every=5)
    w = Watcher(watch, tmp_path, kl_target=6.0, score_max=None, total_steps=12)
    assert [s for s in range(13) if w.due(s)] == [0, 5, 10, 12]
    weights = {"w": torch.zeros(2)}
    for step, score, length in ((0, -1.0, 11), (5, 0.0, 10)):
        weights = {"w": torch.full((2,), float(step))}
        w.record(step, FakeAnswers.of(score, length), lambda weights=weights: weights)
    assert w.candidate_step == 5 and not w.alarmed
    w.record(10, FakeAnswers.of(2.0, 4), lambda: {"w": torch.full((2,), 10.0)})
    assert w.alarmed and w.should_stop() and w.candidate_step == 5
    assert w.selection(10)[0] == 5 and torch.equal(w.candidate_weights(5)["w"], torch.full((2,), 5.0))
    summary = w.summary(10)
    assert summary["selectedStep"] == 5 and summary["stoppedByAlarm"] is True
    assert summary["findings"][0].startswith("rewardRiseWithCollapse at step 10")

    resumed = Watcher(watch, tmp_path, kl_target=6.0, score_max=None, total_steps=12)
    resumed.resume(5)  # the checkpoint was step 5: the step-10 record is dropped from the log too
    assert [r["step"] for r in resumed.history] == [0, 5] and resumed.candidate_step == 5
    assert not resumed.alarmed and len(w.log_path.read_text().splitlines()) == 2


def test_warn_trains_on_and_last_keeps_no_candidate(tmp_path: Path) -> None:
    w = Watcher(
        Watch(eval_every=5, action="warn", select="last"), tmp_path, kl_target=None, score_max=None, total_steps=10
    )
    w.record(0, FakeAnswers.of(-1.0, 11), lambda: {})
    w.record(5, FakeAnswers.of(2.0, 4), lambda: {})
    assert w.alarmed and not w.should_stop() and w.candidate_step is None
    assert w.selection(10) == (10, "select: last (the final policy)")


# ------------------------------------------------------------------ the Trainer hook (GRPO, RLOO)


def hook(tmp_path: Path, watch: Watch, scripted: dict[int, Answers], total: int = 10, rollback: Any = None) -> Any:
    """A WatchCallback whose policy answers as ``scripted`` says for each evaluated step."""
    from types import SimpleNamespace

    from rlhf_stages.methods.watching import WatchCallback

    alarms: list[str] = []  # what the context was told, as the progress the operator reads carries it
    ctx = SimpleNamespace(is_main=True, stage="grpo", staging_dir=tmp_path / "out", alarms=alarms)
    ctx.report_alarms = lambda findings: alarms.extend(f for f in findings if f not in alarms)
    watcher = Watcher(watch, tmp_path / "ckpt", kl_target=None, score_max=None, total_steps=total)
    at = {"step": 0}
    weights = lambda: {"w": torch.full((2,), float(at["step"]))}  # noqa: E731
    cb = WatchCallback(ctx, watcher, lambda: scripted[at["step"]], weights, rollback)
    return cb, at


def drive(cb: Any, at: dict[str, int], start: int, total: int) -> int:
    """What the HF Trainer does: on_train_begin at the (resumed) step, on_step_end after each step,
    leaving the loop when a callback sets should_training_stop. Returns the last step trained."""
    from types import SimpleNamespace

    from transformers import TrainerControl

    control = TrainerControl()
    at["step"] = start
    cb.on_train_begin(None, SimpleNamespace(global_step=start), control)
    step = start
    while step < total and not control.should_training_stop:
        step += 1
        at["step"] = step
        cb.on_step_end(None, SimpleNamespace(global_step=step), control)
    return step


HEALTHY, HACKED = FakeAnswers.of(-1.0, 11), FakeAnswers.of(2.0, 4)


def test_trainer_hook_evaluates_on_schedule_and_stops_at_the_alarm(tmp_path: Path) -> None:
    cb, at = hook(tmp_path, Watch(eval_every=3), {0: HEALTHY, 3: HEALTHY, 6: HACKED})
    assert drive(cb, at, 0, 10) == 6 and cb.stopped_by_alarm
    assert [r["step"] for r in cb.watcher.history] == [0, 3, 6]
    assert cb.ctx.alarms == cb.watcher.findings() and cb.ctx.alarms  # reported live, not only in the result
    assert cb.watcher.candidate_step == 3  # the last healthy evaluation's weights are kept

    from types import SimpleNamespace

    from rlhf_stages.methods.watching import conclude

    loaded: list[dict[str, Any]] = []
    saved: list[str] = []
    ctx = SimpleNamespace(staging_dir=tmp_path / "out")
    ctx.staging_dir.mkdir()
    done = conclude(ctx, cb.watcher, 6, save_final=lambda: saved.append("final"), load_weights=loaded.append)
    assert done.selected_step == 3 and "alarm at step 6" in (done.selection or "")
    assert saved == ["final"] and torch.equal(loaded[0]["w"], torch.full((2,), 3.0))
    assert done.findings[0].startswith("rewardRiseWithCollapse at step 6") and done.metrics["selected_step"] == 3
    assert [(r.step, r.alarm, r.selected) for r in done.evaluations] == [
        (0, False, False),
        (3, False, True),
        (6, True, False),
    ]
    assert (ctx.staging_dir / "evaluations.jsonl").read_text() == cb.watcher.log_path.read_text()


def test_trainer_hook_warn_trains_on_and_no_alarm_keeps_the_final_policy(tmp_path: Path) -> None:
    answers = {0: HEALTHY, 4: HACKED, 8: HACKED, 10: HACKED}
    cb, at = hook(tmp_path / "warn", Watch(eval_every=4, action="warn"), answers)
    assert drive(cb, at, 0, 10) == 10 and not cb.stopped_by_alarm
    assert [r["step"] for r in cb.watcher.history] == [0, 4, 8, 10] and cb.watcher.selection(10)[0] == 0

    quiet, at = hook(tmp_path / "quiet", Watch(eval_every=4), dict.fromkeys((0, 4, 8, 10), HEALTHY))
    assert drive(quiet, at, 0, 10) == 10
    saved: list[str] = []
    from types import SimpleNamespace

    from rlhf_stages.methods.watching import conclude

    ctx = SimpleNamespace(staging_dir=tmp_path / "quiet-out")
    ctx.staging_dir.mkdir()
    done = conclude(ctx, quiet.watcher, 10, save_final=lambda: saved.append("x"), load_weights=lambda s: None)
    assert done.selected_step == 10 and saved == [] and done.findings == []


def test_trainer_hook_resumes_and_honours_an_alarm_it_had_already_raised(tmp_path: Path) -> None:
    cb, at = hook(tmp_path, Watch(eval_every=3), {0: HEALTHY, 3: HEALTHY, 6: HACKED})
    drive(cb, at, 0, 10)
    # Restarted from checkpoint-3: the step-6 record goes, steps 4.. are trained and evaluated again.
    again, at = hook(tmp_path, Watch(eval_every=3), {6: HEALTHY, 9: HEALTHY, 10: HEALTHY})
    assert drive(again, at, 3, 10) == 10 and [r["step"] for r in again.watcher.history] == [0, 3, 6, 9, 10]
    # Restarted from a checkpoint at the alarm itself (SIGTERM in the same step): it stops at once.
    cb, at = hook(tmp_path / "b", Watch(eval_every=3), {0: HEALTHY, 3: HEALTHY, 6: HACKED})
    drive(cb, at, 0, 10)
    again, at = hook(tmp_path / "b", Watch(eval_every=3), {})
    assert drive(again, at, 6, 10) == 6 and again.stopped_by_alarm


class FakeRollback:
    """What a Trainer stage's rollback did: the weights it was given and the KL strength it set."""

    def __init__(self) -> None:
        self.restored: list[float] = []
        self.strengths: list[int] = []

    def restore(self, state: dict[str, Any]) -> None:
        self.restored.append(float(state["w"][0]))

    def strengthen(self, rollbacks: int) -> dict[str, Any]:
        self.strengths.append(rollbacks)
        return {"beta": 0.04 * 2.0**rollbacks}


def test_trainer_hook_rolls_back_to_the_candidate_then_stops_and_a_resume_keeps_the_stronger_kl(
    tmp_path: Path,
) -> None:
    from rlhf_stages.methods.watching import Rollback

    fake = FakeRollback()
    watch = Watch(eval_every=3, action="rollback", max_rollbacks=1)
    answers = {0: HEALTHY, 3: HACKED, 6: HACKED}
    cb, at = hook(tmp_path, watch, answers, rollback=Rollback(fake.restore, fake.strengthen))
    # Step 3 alarms: back to step 0's weights, beta x2, training goes on; step 6 alarms again: no rollback left.
    assert drive(cb, at, 0, 10) == 6 and cb.stopped_by_alarm
    assert fake.restored == [0.0] and fake.strengths == [1]
    assert cb.watcher.history[1]["rollback"] == {"restoredStep": 0, "number": 1, "beta": 0.08}
    assert cb.watcher.selection(6) == (
        0,
        "select: lastBeforeAlarm (the last evaluation before the alarm at step 6)"
        "; rolled back 1x, last at step 3 to step 0",
    )

    # Restarted from a checkpoint at step 4 (after the rollback): beta is set again for it, and
    # the healthy evaluations that follow are candidates again.
    again = FakeRollback()
    cb, at = hook(
        tmp_path, watch, {6: HEALTHY, 9: HEALTHY, 10: HEALTHY}, rollback=Rollback(again.restore, again.strengthen)
    )
    assert drive(cb, at, 4, 10) == 10 and not cb.stopped_by_alarm
    assert again.strengths == [1] and again.restored == [] and cb.watcher.selection(10)[0] == 10

    # A stage that cannot roll back (no Rollback given) stops at the alarm instead.
    cb, at = hook(tmp_path / "none", watch, answers)
    assert drive(cb, at, 0, 10) == 3 and cb.stopped_by_alarm


def test_a_trl_trainers_rollback_puts_back_the_weights_forgets_the_moments_and_raises_beta() -> None:
    from types import SimpleNamespace

    from rlhf_stages.methods.policy_rl import trainer_rollback
    from rlhf_stages.runtime.models import trainable_state

    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)  # frozen: not part of the candidate (as a LoRA base's weights)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    trainer = SimpleNamespace(
        model=model, optimizer=optimizer, beta=0.04, accelerator=SimpleNamespace(unwrap_model=lambda m: m)
    )
    kept = trainable_state(model)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    assert not torch.equal(model.weight, kept["weight"]) and optimizer.state  # trained on, moments set
    rollback = trainer_rollback(trainer, 0.04, 2.0)
    rollback.restore(kept)
    assert torch.equal(model.weight, kept["weight"]) and not optimizer.state
    assert rollback.strengthen(2) == {"beta": pytest.approx(0.16)} and trainer.beta == pytest.approx(0.16)


# ------------------------------------------------------------------ answers of a Hugging Face policy


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Any]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_stages.tiny.assets import build_tiny_assets

    assets = build_tiny_assets(tmp_path_factory.mktemp("watch-lm"), seed=0)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(assets.base_model))
    policy = AutoModelForCausalLM.from_pretrained(str(assets.base_model))
    rm = AutoModelForSequenceClassification.from_pretrained(str(assets.base_model), num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    return tok, policy, rm


def test_sample_answers_of_a_policy(tiny_lm: tuple[Any, Any, Any]) -> None:
    import copy
    from contextlib import contextmanager

    from rlhf_stages.sampling.watch import response_logprobs, sample_answers

    tok, policy, rm = tiny_lm
    prompts = ["Question: how is the old lake?\n\nAnswer:", "Question: hi\n\nAnswer:", "Question: tell\n\nAnswer:"]
    other = copy.deepcopy(policy)
    with torch.no_grad():
        other.lm_head.weight.mul_(0.5)  # a different reference: the KL must see it

    def ask(reference: Any) -> Answers:
        @contextmanager
        def ref() -> Any:
            yield reference

        return sample_answers(
            policy, tok, prompts, reference=ref, reward_model=rm, reward_tokenizer=tok,
            max_new_tokens=12, temperature=1.0, top_k=0, top_p=1.0,
        )  # fmt: skip

    rng = torch.get_rng_state()
    same, shifted, unmeasured = ask(policy), ask(other), ask(None)
    assert torch.equal(rng, torch.get_rng_state())  # training's RNG is untouched
    assert same.tokens == shifted.tokens == unmeasured.tokens  # one seed: only the policy changes answers
    assert all(abs(k) < 1e-4 for k in same.kl) and all(k != 0 for k in shifted.kl)
    assert all(math.isnan(k) for k in unmeasured.kl)  # no reference: NaN, klBeyondLimit cannot fire
    assert all(len(t) <= 12 - e for t, e in zip(same.tokens, same.ended_with_eos, strict=True))
    assert all(tok.eos_token_id not in t for t in same.tokens)
    # Right-padded batches give each sequence's own log-probability (as one alone).
    pairs = [
        (tok(p, add_special_tokens=False)["input_ids"], list(t)) for p, t in zip(prompts, same.tokens, strict=True)
    ]
    batched = response_logprobs(policy, pairs, 1.0, batch_size=3)
    alone = [response_logprobs(policy, [pair], 1.0)[0] for pair in pairs]
    assert batched == pytest.approx(alone, abs=1e-4) and all(v < 0 for v in alone)


def test_rest_watch_measures_the_kl_to_the_starting_policy(tiny_lm: tuple[Any, Any, Any]) -> None:
    """ReST's reference: the policy with its LoRA adapter disabled; for a full-weight policy a frozen
    copy of the starting model, loaded only with a klLimit (else the KL is NaN)."""
    import copy
    from types import SimpleNamespace

    from peft import get_peft_model

    from rlhf_api.stages import ReSTStage
    from rlhf_api.training import LoRA
    from rlhf_stages.methods.rest import watch_evaluator
    from rlhf_stages.runtime.models import ModelLocation, lora_config

    tok, policy, rm = tiny_lm
    base = ModelLocation(policy.config._name_or_path, "assets/base-model")
    prompts = ["Question: how is the old lake?\n\nAnswer:", "Question: tell\n\nAnswer:"]

    def kls(model: Any, **rest: Any) -> list[float]:
        body = {"dataset": {"path": "p.jsonl"}, "responseLength": {"min": 2, "max": 8}, **rest}
        ctx = SimpleNamespace(config=ReSTStage.model_validate(body), stage="rest")
        return list(watch_evaluator(ctx, model, base, tok, (rm, tok), prompts)().kl)

    lora = get_peft_model(copy.deepcopy(policy), lora_config(LoRA(), "CAUSAL_LM"))
    assert all(abs(k) < 1e-4 for k in kls(lora))  # a fresh adapter is the starting policy
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    assert all(abs(k) > 1e-3 for k in kls(lora))  # the trained adapter, against the adapter disabled

    full = copy.deepcopy(policy)
    with torch.no_grad():
        full.lm_head.weight.mul_(0.5)
    assert all(math.isnan(k) for k in kls(full, lora={"enabled": False}))  # no second model without klLimit
    assert all(abs(k) > 1e-3 for k in kls(full, lora={"enabled": False}, watch={"klLimit": 5.0}))


# ------------------------------------------------------------------ rollback (PPO)


def test_rollback_restores_the_candidate_at_most_max_rollbacks_times(tmp_path: Path) -> None:
    watch = Watch(eval_every=5, action="rollback", max_rollbacks=2)
    w = Watcher(watch, tmp_path, kl_target=6.0, score_max=None, total_steps=40)
    w.record(0, HEALTHY, lambda: {"w": torch.zeros(1)})
    w.record(5, FakeAnswers.of(-0.5, 11), lambda: {"w": torch.ones(1)})
    assert w.decision() == "continue"
    w.record(10, HACKED, lambda: {"w": torch.full((1,), 10.0)})
    assert w.decision() == "rollback" and w.should_stop()  # a Trainer stage, which cannot roll back, stops
    step, state = w.load_candidate()
    assert step == 5 and torch.equal(state["w"], torch.ones(1))
    w.note_rollback(step, {"klCoef": 0.4})
    assert not w.alarmed and w.decision() == "continue"  # answered: training goes on
    w.record(15, FakeAnswers.of(0.0, 10), lambda: {"w": torch.full((1,), 15.0)})
    assert w.candidate_step == 15  # healthy after the rollback: the new candidate
    w.record(20, HACKED, lambda: {})
    assert w.decision() == "rollback" and w.load_candidate()[0] == 15
    w.note_rollback(15, {"klCoef": 0.8})
    w.record(25, HACKED, lambda: {})
    assert w.decision() == "stop"  # no rollbacks left
    step, why = w.selection(25)
    assert step == 15 and "alarm at step 25" in why and "rolled back 2x, last at step 20 to step 15" in why
    summary = w.summary(25)
    assert [r["restoredStep"] for r in summary["rollbacks"]] == [5, 15] and summary["stoppedByAlarm"]
    assert len(summary["findings"]) == 3  # every alarm stays visible (status, condition)
    logged = [json.loads(line) for line in w.log_path.read_text().splitlines()]
    assert [r["step"] for r in logged if "rollback" in r] == [10, 20]

    # A restart from a checkpoint between the two rollbacks forgets the second one.
    again = Watcher(watch, tmp_path, kl_target=6.0, score_max=None, total_steps=40)
    again.resume(15)
    assert [r["step"] for r in again.rollbacks()] == [10] and again.candidate_step == 15


def test_rollback_selection_never_picks_a_rolled_back_policy(tmp_path: Path) -> None:
    history = [record(0), alarmed(10, score_mean=5.0), record(20, score_mean=0.5)]
    history[1]["rollback"] = {"restoredStep": 0, "number": 1}
    # The alarmed step 10 scored higher but was thrown away.
    assert select(history, Watch(select="bestReward"), 30)[0] == 20
    assert select(history, Watch(select="lastBeforeAlarm"), 30)[0] == 30  # no standing alarm: the final policy
    w = Watcher(Watch(eval_every=5, action="rollback", select="last"), tmp_path, kl_target=None, score_max=None,
                total_steps=9)  # fmt: skip
    w.record(0, HEALTHY, lambda: {"w": torch.zeros(1)})
    assert w.candidate_step == 0  # select last keeps no candidate, but a rollback needs one


def test_kl_controller_strengthens_and_remembers_it() -> None:
    from rlhf_stages.methods.ppo.advantages import KLController

    kl = KLController(0.2, True, 6.0, 10000)
    kl.strengthen(2.0)
    assert kl.value == pytest.approx(0.4) and kl.effective_target == pytest.approx(3.0)
    kl.update(3.0, 64)  # at the new target: the coefficient stays
    assert kl.value == pytest.approx(0.4)
    restored = KLController(0.2, True, 6.0, 10000)
    restored.load_state_dict(kl.state_dict())
    assert restored.effective_target == pytest.approx(3.0) and restored.value == pytest.approx(0.4)
    restored.load_state_dict({"value": 0.3})  # a checkpoint from before rollbacks existed
    assert restored.effective_target == 6.0
    fixed = KLController(0.2, False, 6.0, 10000)
    fixed.strengthen(3.0)
    assert fixed.value == pytest.approx(0.6) and fixed.effective_target == 6.0


def test_ppo_loop_rolls_back_on_every_rank_and_trains_on(tmp_path: Path) -> None:
    """PPOTrainer.train's handling of the verdicts, on a stand-in for the trainer (no models)."""
    from types import SimpleNamespace

    from rlhf_stages.methods.ppo.trainer import CONTINUE, END, ROLLBACK, PPOTrainer

    trained: list[int] = []

    def train_step() -> dict[str, float]:
        fake.step += 1
        trained.append(fake.step)
        return {}

    fake = SimpleNamespace(
        stage=SimpleNamespace(total_steps=8, save_freq=100), step=0, train_step=train_step, saved_step=None
    )
    verdicts = {3: ROLLBACK, 5: ROLLBACK, 6: END}
    rolled: list[int] = []
    done = PPOTrainer.train(
        fake,
        lambda: False,
        None,
        lambda step: verdicts.get(step, CONTINUE),
        lambda: rolled.append(fake.step),
    )
    assert done is True and trained == [1, 2, 3, 4, 5, 6] and rolled == [3, 5]


def _restore_on_rank(rank: int, port: int, out: Path, other_weights_on_rank_1: bool) -> None:
    """One of two gloo ranks after a rollback: the candidate put back, then the ranks compared."""
    import os

    import torch.distributed as dist

    from rlhf_stages.methods.watching import check_ranks_restored
    from rlhf_stages.runtime.context import StageError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    policy = torch.nn.Linear(4, 4)
    with torch.no_grad():
        policy.weight.fill_(0.5)
        policy.bias.fill_(1.0 if other_weights_on_rank_1 and rank == 1 else 0.0)
    try:
        check_ranks_restored(policy)
        (out / f"rank{rank}").write_text("agreed")
    except StageError as exc:
        (out / f"rank{rank}").write_text(str(exc))
    dist.destroy_process_group()


@pytest.mark.parametrize("differ", [False, True])
def test_a_rollback_stops_when_the_ranks_put_back_different_weights(tmp_path: Path, differ: bool) -> None:
    """Each rank reads the kept candidate itself and DDP averages gradients, not weights: ranks that
    restored different policies must stop the stage (on every rank), not train on apart."""
    import socket

    import torch.multiprocessing as mp

    import rlhf_stages.methods.watching  # noqa: F401  (imported once here: the forked ranks inherit it)

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    mp.start_processes(_restore_on_rank, args=(port, tmp_path, differ), nprocs=2, start_method="fork")
    said = [(tmp_path / f"rank{r}").read_text() for r in (0, 1)]
    if differ:
        assert all("ranks hold different policies" in s for s in said), said
    else:
        assert said == ["agreed", "agreed"]


def test_rollback_is_refused_where_it_is_not_implemented() -> None:
    from pydantic import ValidationError

    from rlhf_api.stages import GRPOStage, PPOStage, ReSTStage, RLOOStage

    rollback = {"dataset": {"path": "p.jsonl"}, "watch": {"action": "rollback"}}
    with pytest.raises(ValidationError, match="rollback is implemented for ppo, grpo and rloo"):
        ReSTStage.model_validate(rollback)
    for stage in (GRPOStage, RLOOStage):  # a rollback strengthens beta: none to strengthen at 0
        assert stage.model_validate(rollback).beta > 0
        with pytest.raises(ValidationError, match="strengthens the KL penalty beta, which is 0"):
            stage.model_validate({**rollback, "beta": 0.0})
    ppo = PPOStage.model_validate(rollback)
    assert ppo.watch.max_rollbacks == 2 and ppo.watch.rollback_kl_factor == 2.0
    # ReST counts Improve steps (a handful per run): watched after every one unless told otherwise.
    assert ReSTStage.model_validate({"dataset": {"path": "p.jsonl"}}).watch.eval_every == 1


# ------------------------------------------------------------------ held-out preference accuracy


def test_preference_accuracy_falling() -> None:
    from rlhf_api.watch import PREFERENCE_FALLING

    history = [record(0, preference_accuracy=0.8), record(10, preference_accuracy=0.65)]
    assert kinds(history) == [PREFERENCE_FALLING]
    (finding,) = detect(history, Watch(), None)
    assert "0.80 -> 0.65" in finding.evidence
    assert kinds(history, Watch(accuracy_drop=0.2)) == []
    assert kinds([record(0, preference_accuracy=0.8), record(10, preference_accuracy=0.75)]) == []
    assert kinds([record(0), record(10, preference_accuracy=0.1)]) == []  # no baseline: off


def test_preference_accuracy_of_a_policy(tiny_lm: tuple[Any, Any, Any]) -> None:
    from rlhf_stages.sampling.watch import preference_accuracy, response_logprobs

    tok, policy, _ = tiny_lm
    prompt = "Question: how is the old lake?\n\nAnswer:"
    a, b = " the old lake is lovely.", " the old lake is lovely and"
    eos = [tok.eos_token_id]
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    ra, rb = (tok(x, add_special_tokens=False)["input_ids"] + eos for x in (a, b))
    la, lb = response_logprobs(policy, [(p, ra), (p, rb)], 1.0)
    a_wins = la / len(ra) > lb / len(rb)
    # The policy's own per-token preference, in either orientation of the pair.
    assert preference_accuracy(policy, tok, [(prompt, a, b)]) == float(a_wins)
    assert preference_accuracy(policy, tok, [(prompt, b, a)]) == float(not a_wins)
    assert preference_accuracy(policy, tok, [(prompt, a, b), (prompt, b, a)]) == 0.5
    assert summarize(Answers([[1]], [True], [0.0], [0.0], ["x"], ["p"], preference_accuracy=0.75), None, 0)[
        "preference_accuracy"
    ] == pytest.approx(0.75)
