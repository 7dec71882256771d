"""The README's first command, end to end: tiny assets, the whole pipeline, evaluation, report.

Runs ``rlhfctl quickstart`` exactly as ``make demo`` does and checks that the report's numbers
show learning on held-out prompts, not only that the stages ran.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.pythonpath import REPO, python_env

# The whole pipeline trains in the first test's setup; on a loaded 2-core machine that outlasts 900 s.
pytestmark = [pytest.mark.training, pytest.mark.timeout(2400)]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("quickstart")
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_operator.cli", "quickstart", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
        env=python_env(),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return workdir, proc.stdout, json.loads((workdir / "report" / "report.json").read_text())


def test_report_files_are_written(quickstart):
    workdir, stdout, report = quickstart
    assert (workdir / "report" / "report.md").read_text().startswith("# RLHF run report")
    for plot in report["plots"]:
        assert (workdir / "report" / plot["file"]).stat().st_size > 1000
    assert {p["metric"] for p in report["plots"]} >= {"reward_mean", "kl"}
    assert "held-out reward" in stdout
    assert (workdir / "volume/runs/default/tiny/merge/model/config.json").exists()


def test_reward_model_ranks_held_out_pairs(quickstart):
    _, _, report = quickstart
    assert report["reward_model_eval_accuracy"] >= 0.9


def test_aligned_policy_beats_sft_on_held_out_prompts(quickstart):
    _, _, report = quickstart
    sft, aligned = report["heldout"]["sft"], report["heldout"]["aligned"]
    # What PPO optimised, on prompts about topics it never saw: +1.3 to +2.4 in the runs measured.
    assert aligned["reward_mean"] > sft["reward_mean"] + 0.5, report["heldout"]
    assert aligned["eos_rate"] >= 0.9, report["heldout"]
    # The ground-truth rate is in the report but not asserted: across runs it moved by -0.03 to
    # +0.18 (the reward model's training is not bit-reproducible on CPU and PPO exploits what it
    # gets wrong); see tests/stages/test_ppo_learning.py.


def test_rerun_skips_completed_stages(quickstart):
    workdir, _, _ = quickstart
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_operator.cli", "run-local", "examples/tiny.yaml", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=python_env(),
        cwd=REPO,  # the manifest's path is relative
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for stage in ("sft", "reward", "ppo", "merge"):
        line = next(ln for ln in proc.stdout.splitlines() if ln.strip().startswith(stage) and "Succeeded" in ln)
        assert float(line.split(" in ")[1].split("s")[0]) < 30, line  # done before: exits at once
