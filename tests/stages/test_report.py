"""The quickstart report for runs without a reward model (DPO, RLAIF then DPO): ground truth only."""

from __future__ import annotations

import json
from pathlib import Path

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
