"""The quickstart report for runs without a reward model (DPO, RLAIF then DPO): ground truth only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_stages.report import build_report


def _manifest(run_dir: Path, stage: str, metrics: dict[str, float]) -> None:
    (run_dir / stage).mkdir(parents=True)
    (run_dir / stage / "manifest.json").write_text(json.dumps({"stage": stage, "step": 3, "metrics": metrics}))


def test_rlaif_then_dpo_report_compares_ground_truth_and_shows_the_judge(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _manifest(run_dir, "sft", {"eval_loss": 1.0})
    labelling = {"pairs_labelled": 425.0, "pairs_judged": 958.0, "agreement_rate": 0.444, "first_position_rate": 0.63}
    _manifest(run_dir, "rlaif", labelling | {"dropped_identical": 2.0})
    _manifest(run_dir, "dpo", {"eval_preference_accuracy": 0.72})
    before = {"reward_mean": None, "target_rate": 0.32, "eos_rate": 1.0}
    after = {"reward_mean": None, "target_rate": 0.63, "eos_rate": 0.98}

    report = build_report(run_dir, before, after, {"sft": 60.0, "rlaif": 25.0, "dpo": 21.0}, tmp_path / "out")

    assert report["improvement"]["reward_mean"] is None
    assert abs(report["improvement"]["target_rate"] - 0.31) < 1e-9
    assert report["policy_stage"] == "dpo"
    assert report["labelling"] == labelling
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "RLAIF judge: **425** of 958 pairs labelled" in markdown and "agreeing: 0.44" in markdown
    assert "| reward-model score (mean) | n/a | n/a | n/a |" in markdown
    assert json.loads((tmp_path / "out" / "report.json").read_text())["labelling"] == labelling


@pytest.mark.parametrize("stage", ["ppo", "rest"])  # ReST's watch reaches the report the same way
def test_the_report_shows_the_watch_its_alarm_table_samples_and_the_kept_checkpoint(tmp_path: Path, stage: str) -> None:
    run_dir = tmp_path / "run"
    _manifest(run_dir, "sft", {"eval_loss": 1.0})
    records = [
        {
            "step": 0,
            "score_mean": -1.0,
            "length_mean": 11.0,
            "findings": [],
            "samples": [{"prompt": "q?", "answer": "a.", "score": -1.0}],
        },
        {
            "step": 5,
            "score_mean": 2.0,
            "length_mean": 4.0,
            "check_pass_rate": 0.5,
            "findings": ["x at step 5: y"],
            "samples": [{"prompt": "q?", "answer": "a", "score": 2.0, "failed_checks": ["sentence"]}],
        },
    ]
    watch = {
        "findings": ["rewardRiseWithCollapse at step 5: score up, length down"],
        "selectedStep": 0,
        "selection": "select: lastBeforeAlarm (the last evaluation before the alarm at step 5)",
        "evaluations": [
            {k: r[k] for k in ("step", "score_mean", "length_mean", "check_pass_rate") if k in r}
            | {"alarm": bool(r["findings"])}
            for r in records
        ],
        "log": "evaluations.jsonl",
    }
    (run_dir / stage).mkdir()
    (run_dir / stage / "manifest.json").write_text(
        json.dumps({"stage": stage, "metrics": {}, "details": {"watch": watch}})
    )
    (run_dir / stage / "evaluations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    before = {"reward_mean": -1.0, "target_rate": 0.3, "eos_rate": 1.0}

    report = build_report(run_dir, before, before, {}, tmp_path / "out")

    assert report["watch"]["selectedStep"] == 0 and report["watch"]["samples"]["5"][0]["answer"] == "a"
    assert {p["metric"] for p in report["plots"]} >= {"watch score_mean", "watch length_mean"}
    assert (tmp_path / "out" / f"{stage}_watch_score_mean.png").is_file()
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "**ALARM**: rewardRiseWithCollapse at step 5" in markdown
    assert "Output: step 0 (select: lastBeforeAlarm" in markdown
    # the checks column only because this run measured them; the preference accuracy was not
    assert "| step | score | score sd | KL | length | EOS | distinct-2 | checks passed | |" in markdown
    assert "| 0 | -1.000 | n/a | n/a | 11.000 | n/a | n/a | n/a | output |" in markdown
    assert "| 5 | 2.000 | n/a | n/a | 4.000 | n/a | n/a | 0.500 | alarm |" in markdown
    assert "| 5 | q? | a (fails sentence) | 2.000 |" in markdown and "| 0 | q? | a. | -1.000 |" in markdown


def test_a_quiet_watch_says_which_signals_that_know_a_good_answer_were_off() -> None:
    """No finding is not "no hack": without a judge, checks or a preference set the watch sees only the
    answers' shape (docs/watch.md measured a flipped-sentiment hack that no shape signal saw). The report
    and rlhfctl say so; with one of them on, they do not."""
    from rlhf_api.watch import EvaluationRow
    from rlhf_operator.cli.cluster import watch_lines
    from rlhf_stages.report import watch_markdown

    shape_only = [{"step": 0, "score_mean": 1.0, "length_mean": 9.0}, {"step": 5, "score_mean": 3.0}]
    judged = [{**row, "judge_win_rate": 0.5} for row in shape_only]

    def quiet_line(table: list[dict[str, float]]) -> str:
        watched = {"findings": [], "selectedStep": 5, "selection": "final", "evaluations": table}
        return next(line for line in watch_markdown(watched) if line.startswith("No detector fired"))

    note = "no alarm, but this watch had no preferenceSet, no checks, no judge: it saw only the answers' shape"
    assert quiet_line(shape_only).startswith(f"No detector fired: {note}")
    assert quiet_line(judged) == "No detector fired (docs/watch.md says what they cannot see)."

    def rows(table: list[dict[str, float]]) -> list[EvaluationRow]:
        return [
            EvaluationRow(step=r["step"], score=r["score_mean"], judge_win_rate=r.get("judge_win_rate")) for r in table
        ]

    assert watch_lines([], "final", rows(shape_only), 2)[-1].startswith(f"  {note}")
    assert not any("no alarm" in line for line in watch_lines([], "final", rows(judged), 2))
    assert not any("no alarm" in line for line in watch_lines(["x at step 5: y"], None, rows(shape_only), 2))
