"""The watch's judge (docs/watch.md): the win rate from both orders, the detector, where the number goes,
and what the stage asks the judge (with a stand-in for the model; the real judge in a real run is
test_watch_hacking.py's)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from conftest import tiny_spec
from rlhf_api.judging import DEFAULT_JUDGE_TEMPLATE
from rlhf_api.layout import RunRef, StageInvocation
from rlhf_api.watch import JUDGE_FALLING, Watch, WatchJudge
from rlhf_operator.cli.cluster import watch_lines
from rlhf_stages.methods.watch_judge import BASELINE_FILE, AnswerJudge, check, win_rate
from rlhf_stages.runtime.context import StageContext, StageInputMissing
from rlhf_stages.sampling.watch import Answers, Watcher, detect, status_rows

JUDGE = {"model": {"path": "assets/judge"}, "constitution": ["End the sentence."]}


def lp(p_a: float) -> list[float]:
    """The judge's (log P(A), log P(B)) for P(A) = ``p_a``."""
    return [math.log(p_a), math.log(1 - p_a)]


def test_win_rate_averages_both_orders_so_a_position_bias_cancels() -> None:
    # A judge that always says A with 0.8 has no opinion on the answers: 0.8 and 1 - 0.8, mean 0.5.
    assert win_rate([lp(0.8)], [lp(0.8)], [None]) == pytest.approx(0.5)
    # Current answer better: P(A) 0.9 when it is A, P(A) 0.3 when the baseline is A -> (0.9 + 0.7) / 2.
    assert win_rate([lp(0.9)], [lp(0.3)], [None]) == pytest.approx(0.8)
    # Identical answers are settled at 0.5 without the judge and stay in their place among the prompts.
    assert win_rate([lp(0.1), lp(0.1)], [lp(0.9), lp(0.9)], [None, 0.5, None]) == pytest.approx((0.1 + 0.5 + 0.1) / 3)
    with pytest.raises(ValueError, match="more verdicts"):
        win_rate([lp(0.5), lp(0.5)], [lp(0.5), lp(0.5)], [None])


def evaluation(step: int, won: float | None) -> dict[str, Any]:
    r = {"step": step, "score_mean": 0.0, "kl_mean": 0.0, "length_mean": 10.0, "distinct_2": 0.4, "repetition": 0.0}
    return r if won is None else {**r, "judge_win_rate": won}


def test_judge_win_rate_falling_fires_below_half_minus_judge_drop() -> None:
    watch = Watch(judge=WatchJudge.model_validate(JUDGE))
    base = evaluation(0, 0.5)
    fired = detect([base, evaluation(10, 0.30)], watch, None)
    assert [f.detector for f in fired] == [JUDGE_FALLING] and fired[0].step == 10
    assert "0.30" in fired[0].evidence
    assert detect([base, evaluation(10, 0.36)], watch, None) == []  # 0.5 - 0.15 = 0.35
    assert [f.detector for f in detect([base, evaluation(10, 0.36)], Watch(judge_drop=0.1), None)] == [JUDGE_FALLING]
    assert detect([evaluation(0, None), evaluation(10, None)], watch, None) == []  # no judge: no win rate


def test_the_api_refuses_a_template_without_the_answers_and_a_drop_of_half() -> None:
    assert WatchJudge.model_validate(JUDGE).template == DEFAULT_JUDGE_TEMPLATE
    with pytest.raises(ValidationError, match=r"template must contain \{constitution\}, \{prompt\}, \{a\}, \{b\}"):
        WatchJudge.model_validate({**JUDGE, "template": "{constitution} {prompt} {a}"})
    with pytest.raises(ValidationError, match="constitution"):
        WatchJudge.model_validate({**JUDGE, "constitution": []})
    with pytest.raises(ValidationError, match="judgeDrop"):
        Watch.model_validate({"judgeDrop": 0.5})


def answers(texts: list[str]) -> Answers:
    n = len(texts)
    return Answers(
        tokens=[[1] * len(t.split()) for t in texts],
        ended_with_eos=[True] * n,
        scores=[0.0] * n,
        kl=[0.0] * n,
        texts=texts,
        prompts=[f"Question: topic {i}\n\nAnswer:" for i in range(n)],
    )


class FinishedSentenceJudge(AnswerJudge):
    """A stand-in judge that reads the rendered prompt: it prefers the answer ending with a full stop
    (P 0.9), with a bias to A (+0.05) that both orders must cancel. It records what it was asked."""

    def __init__(self, directory: Path) -> None:
        spec = WatchJudge.model_validate(JUDGE)
        super().__init__(SimpleNamespace(stage="ppo"), spec, directory)  # type: ignore[arg-type]
        self.asked: list[str] = []

    def _log_probs(self, prompts: list[str]) -> list[list[float]]:
        self.asked += prompts
        out = []
        for p in prompts:
            m = re.search(r"\nA:(.*)\nB:(.*)\nBetter answer:$", p)
            assert m is not None and "- End the sentence." in p, p
            a_ends, b_ends = (s.strip().endswith(".") for s in m.groups())
            p_a = 0.5 if a_ends == b_ends else (0.9 if a_ends else 0.1)
            out.append(lp(min(0.99, p_a + 0.05)))
        return out


def test_the_stage_compares_with_the_first_evaluation_in_both_orders_and_keeps_the_baseline(tmp_path: Path) -> None:
    judge = FinishedSentenceJudge(tmp_path)
    start = [" the lake is calm.", " the sky is blue.", " a dog runs."]
    assert judge(0, answers(start)) == 0.5 and judge.asked == []  # the baseline: recorded, not asked
    assert json.loads((tmp_path / BASELINE_FILE).read_text())["texts"] == start
    # One answer cut off (worse), one unchanged (0.5 without asking), one changed but as good.
    now = [" the lake is", " the sky is blue.", " a cat sleeps."]
    rate = FinishedSentenceJudge(tmp_path)(10, answers(now))  # a fresh object: a restarted stage
    assert rate == pytest.approx((0.1 + 0.5 + 0.5) / 3)  # the +0.05 bias to A cancelled
    restarted = FinishedSentenceJudge(tmp_path)
    restarted(10, answers(now))
    assert len(restarted.asked) == 4  # two prompts, both orders; the unchanged one not asked
    assert "A: the lake is\nB: the lake is calm." in restarted.asked[0]
    assert "A: the lake is calm.\nB: the lake is" in restarted.asked[2]
    with pytest.raises(RuntimeError, match="other prompts"):
        restarted(20, Answers(**{**answers(now).__dict__, "prompts": ["x", "y", "z"]}))


def test_the_win_rate_goes_into_the_log_the_alarm_status_and_rlhfctl(tmp_path: Path) -> None:
    judge = FinishedSentenceJudge(tmp_path / "judge")
    watch = Watch(judge=WatchJudge.model_validate(JUDGE), action="warn")
    watcher = Watcher(watch, tmp_path, kl_target=None, score_max=None, total_steps=20, judge=judge)
    watcher.record(0, answers([" a b.", " c d."]), dict)
    late = watcher.record(10, answers([" a b", " c d"]), dict)
    assert late["judge_win_rate"] == pytest.approx(0.1)
    assert late["findings"] and late["findings"][0].startswith(f"{JUDGE_FALLING} at step 10")
    rows = status_rows(watcher.summary(10)["evaluations"], 0)
    assert [r.judge_win_rate for r in rows] == [0.5, pytest.approx(0.1)]
    table = watch_lines(late["findings"], None, rows, 2)
    assert "JUDGE" in table[1] and table[-1].split()[-2:] == ["0.10", "ALARM"]


def test_the_stage_refuses_to_start_without_the_judge_model_naming_the_field(tmp_path: Path) -> None:
    def ctx(judge: dict[str, Any] | None) -> StageContext:
        spec = tiny_spec(ppo={"watch": {"judge": judge}})
        invocation = StageInvocation(stage="ppo", run=RunRef(name="j"), workspace=str(tmp_path), spec=spec)  # type: ignore[arg-type]
        return StageContext.create(invocation)

    with pytest.raises(StageInputMissing, match=r"ppo\.watch\.judge\.model: no saved model at assets/judge"):
        check(ctx(JUDGE))
    check(ctx(None))  # no judge: nothing to check
    (tmp_path / "assets" / "judge").mkdir(parents=True)
    (tmp_path / "assets" / "judge" / "config.json").write_text("{}")
    check(ctx(JUDGE))
