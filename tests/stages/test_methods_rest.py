"""ReST learns from its own best samples: examples/tiny-rest.yaml's ReST stage, 3 seeds, against SFT."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from methods_support import ensure_base, methods_workspace, run_dir, run_methods, sft_evaluation, summary_line

pytestmark = pytest.mark.training

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def volume(workspace: Path) -> Path:
    return methods_workspace(workspace)


@pytest.fixture(scope="module")
def runs(volume: Path) -> list[Any]:
    ensure_base(volume)
    sft = sft_evaluation(volume)
    out = run_methods(volume, "ReST", "rest", {seed: {"rest": {"training": {"seed": seed}}} for seed in SEEDS})
    for run in out:
        print(summary_line("ReST", sft, run))
    return out


def test_rest_beats_sft_on_held_out_prompts(volume: Path, runs: list[Any]) -> None:
    sft = sft_evaluation(volume)
    for r in runs:
        e = r.evaluation
        assert e.reward_mean > sft.reward_mean + 1.0, (r.seed, e, sft)
        assert e.not_positive_rate < sft.not_positive_rate - 0.15, (r.seed, e, sft)
        assert e.eos_rate >= 0.9, (r.seed, e)
    mean_target = sum(r.evaluation.target_rate for r in runs) / len(runs)
    assert mean_target > sft.target_rate, (mean_target, sft)


def test_every_grow_set_is_kept_and_rewards_rise(volume: Path, runs: list[Any]) -> None:
    for r in runs:
        stage_dir = run_dir(volume, f"rest-rest-s{r.seed}") / "rest"
        manifest = json.loads((stage_dir / "manifest.json").read_text())
        assert manifest["details"]["growDatasets"] == ["grow/grow-0.jsonl", "grow/grow-1.jsonl"]
        rows = [json.loads(line) for line in (stage_dir / "grow" / "grow-1.jsonl").read_text().splitlines()]
        assert {"prompt", "completion", "reward", "endedWithEos", "growStep"} <= set(rows[0])
        history = manifest["details"]["history"]
        thresholds = [h["threshold"] for h in history if "threshold" in h]
        # Within a Grow step the filter gets stricter; the second Grow samples from the improved policy.
        assert thresholds[0] <= thresholds[1] <= thresholds[2] and thresholds[3] <= thresholds[4] <= thresholds[5]
        metrics = r.stage.result["metrics"]
        assert metrics["grow1_reward_mean"] > metrics["grow0_reward_mean"], metrics
        assert (stage_dir / "model" / "config.json").is_file()


def test_the_default_watch_raises_no_alarm_on_the_sound_reward_model(volume: Path, runs: list[Any]) -> None:
    """examples/tiny-rest.yaml has no watch section: the default (evaluated after every Improve step,
    action stop) watched these runs. Its false alarm would have stopped them and failed the test
    above; here: no finding on any seed, every Improve step evaluated, the output is the final policy."""
    for r in runs:
        result = r.stage.result
        assert not result.get("findings") and result["step"] == 6, (r.seed, result)
        assert result["selectedStep"] == 6 and "no alarm" in result["selection"], (r.seed, result)
        watch = json.loads((run_dir(volume, f"rest-rest-s{r.seed}") / "rest" / "manifest.json").read_text())
        table = watch["details"]["watch"]["evaluations"]
        assert [e["step"] for e in table] == list(range(7)), table
        print(f"ReST seed {r.seed} watch:", [(e["step"], round(e["score_mean"], 2), e["length_mean"]) for e in table])


def test_quantile_and_grow_rows_round_trip() -> None:
    from rlhf_stages.methods.rest_improve import GrowRow, quantile

    assert quantile([3.0, 1.0, 2.0, 4.0], 0.0) == 1.0
    assert quantile([3.0, 1.0, 2.0, 4.0], 0.5) == pytest.approx(2.5)  # numpy's linear interpolation
    assert quantile([3.0, 1.0, 2.0, 4.0], 0.9) == pytest.approx(3.7)
    row = GrowRow("Question: q?\n\nAnswer:", " the old lake is calm.", 1.5, True, 1)
    assert GrowRow.from_json(row.to_json()) == row
    assert json.loads(row.to_json())["endedWithEos"] is True


def test_rest_resumes_after_sigterm_from_its_last_improve_step(volume: Path) -> None:
    """SIGTERM mid-run: exit 143 with complete checkpoints; the next attempt reuses them and the Grow set."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml
    from methods_support import PYTHON_PATH, REPO, example_spec, link_base, merge_into

    ensure_base(volume)
    run = "rest-resume"
    link_base(volume, run)
    spec = merge_into(
        example_spec("ReST"),
        {"rest": {"dataset": {"maxSamples": 48}, "growSteps": 2, "training": {"perDeviceTrainBatchSize": 4}}},
    )
    config = volume / "configs" / f"{run}-rest.yaml"
    config.write_text(yaml.safe_dump({"stage": "rest", "run": {"name": run}, "workspace": str(volume), "spec": spec}))
    env = {
        **os.environ,
        "PYTHONPATH": PYTHON_PATH,
        "RLHF_TERMINATION_LOG": str(volume / "configs" / f"{run}.json"),
        # Slow each Improve step down (0.2 s per optimizer step) so the signal lands mid-run.
        "RLHF_DEBUG_STEP_DELAY_S": "0.2",
    }
    command = [sys.executable, "-m", "rlhf_stages", "rest", "--config", str(config)]
    checkpoints = run_dir(volume, run) / "rest.checkpoints"

    proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("checkpoint-*")):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the stage ended"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    assert not (run_dir(volume, run) / "rest").exists()  # no output until the stage is complete
    done = sorted(p.name for p in checkpoints.glob("checkpoint-*"))
    assert len(done) == 1 and (checkpoints / "grow-0.jsonl").is_file()
    grow0 = (checkpoints / "grow-0.jsonl").read_text()

    undelayed = {k: v for k, v in env.items() if k != "RLHF_DEBUG_STEP_DELAY_S"}
    second = subprocess.run(command, env=undelayed, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    stage_dir = run_dir(volume, run) / "rest"
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    assert manifest["details"]["resumedFromStep"] == int(done[0].split("-")[1])
    assert manifest["step"] == manifest["totalSteps"] == 6
    assert (stage_dir / "grow" / "grow-0.jsonl").read_text() == grow0  # the Grow set was not resampled
    assert len([h for h in manifest["details"]["history"] if "improve" in h]) == 6
    # The default watch resumed its log: every Improve step evaluated once, none lost or repeated.
    records = [json.loads(line) for line in (stage_dir / "evaluations.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(7)), records
