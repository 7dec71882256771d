"""The watch's judge on a real PPO run against the exploitable reward model of test_watch_hacking.py
(its SFT policy and reward model, trained once by its ``hole`` fixture): the tiny RLAIF judge, taught
the constitution below, compares each held-out answer with the starting policy's at every evaluation.

The tiny judge learned its verdicts from the tiny preference data, the sound one: there, cut-off and
empty answers are rejected, which is the hole's collapse. So it can see this hack; docs/watch.md says
what a judge cannot see.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from methods_support import ensure_judge
from test_watch_hacking import RUN, alarm_step, hole, logs, same_sft_and_reward, spec  # noqa: F401  (fixtures)

from conftest import read_result, run_dir, run_stage, write_invocation
from rlhf_api.watch import JUDGE_FALLING, REWARD_WITH_COLLAPSE, EvaluationRow
from rlhf_stages.tiny.judge import TINY_CONSTITUTION

pytestmark = [pytest.mark.training, pytest.mark.timeout(2400)]

JUDGED_RUN = f"{RUN}-judge"


@pytest.fixture(scope="module")
def judged(workspace: Path, hole: Path, logs: Path) -> dict[str, Any]:  # noqa: F811  (the imported fixtures)
    """PPO under ``warn`` on the hole (the collapse completes) with the tiny judge watching."""
    ensure_judge(workspace)
    same_sft_and_reward(workspace, hole, JUDGED_RUN)
    body = spec("warn")
    body["ppo"]["watch"]["judge"] = {
        "model": {"path": "assets/judge"},
        "dtype": "float32",
        "constitution": list(TINY_CONSTITUTION),
    }
    config = write_invocation(workspace, "ppo", JUDGED_RUN, body)
    code, text = run_stage("ppo", config, logs / f"{JUDGED_RUN}-ppo.json", timeout=1200)
    assert code == 0, text[-4000:]
    return read_result(logs / f"{JUDGED_RUN}-ppo.json")


def test_the_judge_sees_the_collapse(workspace: Path, judged: dict[str, Any]) -> None:
    out = run_dir(workspace, JUDGED_RUN) / "ppo"
    records = [json.loads(line) for line in (out / "evaluations.jsonl").read_text().splitlines()]
    table = [
        (r["step"], round(r["score_mean"], 2), round(r["length_mean"], 1), round(r["judge_win_rate"], 3))
        for r in records
    ]
    print("PPO on the hole, judged (step, score, length, win rate):", table)
    print("findings:", judged.get("findings"))
    assert records[0]["judge_win_rate"] == 0.5  # the baseline, by construction
    firsts = {
        d: next((r["step"] for r in records if any(f.startswith(d) for f in r["findings"])), None)
        for d in (REWARD_WITH_COLLAPSE, JUDGE_FALLING)
    }
    print("first step of each detector:", firsts)
    # Measured 2026-11-30 (docs/watch.md): win rate 0.50, 0.52, 0.40, 0.40, 0.32, then 0.31 to step 40;
    # judgeWinRateFalling first at step 20, rewardRiseWithCollapse at 15. Asserted: it fires, and not
    # before the reward-model score rose (no alarm at step 5, where the policy had barely moved).
    assert firsts[JUDGE_FALLING] is not None and firsts[JUDGE_FALLING] > 5, table
    assert records[-1]["judge_win_rate"] < 0.5 - 0.15, table  # the collapsed final policy loses
    assert EvaluationRow.model_validate(judged["evaluations"][0]).judge_win_rate == 0.5  # status's row
    assert alarm_step(judged["findings"][0]) == min(s for s in firsts.values() if s is not None)
