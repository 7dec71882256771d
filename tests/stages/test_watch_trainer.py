"""The watch in the TRL-based stages, end to end (real stage processes, a few steps each): GRPO stops at
the alarm, RLOO rolls back and trains on; both output the evaluated checkpoint from before the alarm.
(``warn``, the simplest of the three, is the Trainer hook's unit test and the hacking tests'.)

The alarm is forced, not learned: ``klLimit`` is set so low (1e-5 nats; the step-0 policy is the
reference, KL 0) that any step away from it raises ``klBeyondLimit`` at the first evaluation after
step 0. The policy is the untrained tiny base
model and the reward model a stand-in (the same weights read as a scorer), as in
test_sigterm_midstep.py: this is about the mechanics (the callback, the stop, the kept weights, the
output), not about learning. That the detectors fire on a real hack is test_watch_hacking.py's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import read_result, run_dir, run_stage, standin_reward_model, tiny_spec, write_invocation

pytestmark = pytest.mark.training

REWARD_MODEL = "assets-watch/reward-model"
TOTAL, EVERY = 4, 2
# A held-out preference set: its accuracy is recorded at every evaluation (the detector is unit-tested).
PAIRS = {"format": "jsonl", "path": "assets/data/preferences.jsonl", "maxSamples": 16}
# Rule-based checks with known outcomes (every answer fits responseLength.max; none contains the
# pattern): their pass rates are recorded at every evaluation (the detector is unit-tested).
CHECKS = [{"name": "fits", "maxTokens": 12}, {"name": "impossible", "mustMatch": "qqqzzzqqq"}]


@pytest.fixture(scope="module")
def volume(workspace: Path) -> Path:
    standin_reward_model(workspace, REWARD_MODEL)
    return workspace


def spec(stage: str, action: str) -> dict[str, Any]:
    body = {
        "dataset": {"format": "jsonl", "path": "assets/data/prompts.jsonl", "maxSamples": 32, "evalFraction": 0.25},
        "promptTemplate": "{prompt}",
        "lora": {"enabled": False},
        "learningRate": 1.0e-3,
        "numGenerations": 4,
        "batchSize": 2,
        "totalSteps": TOTAL,
        "saveFreq": 10,
        "responseLength": {"min": 2, "max": 12},
        "rewardModel": {"path": REWARD_MODEL},
        "resources": {"gpus": 0, "memory": "4Gi"},
        "watch": {
            "evalEvery": EVERY,
            "evalPrompts": 8,
            "samplesKept": 1,
            "klLimit": 1.0e-5,
            "action": action,
            "preferenceSet": PAIRS,
            "checks": CHECKS,
        },
    }
    out = tiny_spec(sft={"enabled": False}, reward={"enabled": False}, method=stage.upper(), ppo=None)
    out[stage] = body
    return out


@pytest.mark.parametrize(("stage", "action", "processes"), [("grpo", "stop", 1), ("rloo", "rollback", 2)])
def test_alarm_keeps_the_checkpoint_before_it(
    volume: Path, tmp_path: Path, stage: str, action: str, processes: int
) -> None:
    """RLOO's rollback on two processes: rank 0 decides, both ranks put back the candidate (their
    weights compared afterwards) and train on together."""
    from safetensors.torch import load_file

    run = f"watch-{stage}"
    config = write_invocation(volume, stage, run, spec(stage, action))
    code, out = run_stage(stage, config, tmp_path / "result.json", "--nproc", str(processes), timeout=600)
    assert code == 0, out[-4000:]
    assert out.count(f"{stage} watch: rollback ") == (1 if action == "rollback" else 0), "recorded once, by rank 0"
    result = read_result(tmp_path / "result.json")
    assert result["findings"] and result["findings"][0].startswith(f"klBeyondLimit at step {EVERY}"), result
    assert result["step"] == (EVERY if action == "stop" else TOTAL)
    if action == "stop":
        assert result["selectedStep"] == 0 and f"alarm at step {EVERY}" in result["selection"]
    else:  # rolled back at step 2 (beta 0.04 -> 0.08) and trained on; the alarm at the budget stands
        assert result["selectedStep"] == 0 and result["selection"].endswith(
            f"alarm at step {TOTAL}); rolled back 1x, last at step {EVERY} to step 0"
        )
        assert f"{stage} watch: rollback 1 at step {EVERY} to step 0's policy, beta 0.08" in out

    out_dir = run_dir(volume, run) / stage
    records = [json.loads(line) for line in (out_dir / "evaluations.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == ([0, EVERY] if action == "stop" else [0, EVERY, TOTAL])
    assert abs(records[0]["kl_mean"]) < 1e-3 < records[1]["kl_mean"]  # the reference is the starting policy
    assert records[0]["prompts"] == 8 and len(records[0]["samples"]) == 1
    assert all(0.0 <= r["preference_accuracy"] <= 1.0 for r in records)
    notes = {r["step"]: r["rollback"] for r in records if "rollback" in r}
    assert notes == ({EVERY: {"restoredStep": 0, "number": 1, "beta": pytest.approx(0.08)}} if action != "stop" else {})
    assert all(r["checks"] == {"fits": 1.0, "impossible": 0.0} and r["check_pass_rate"] == 0.0 for r in records)
    assert records[0]["samples"][0]["failed_checks"] == ["impossible"]
    # What status shows comes in the result: every evaluation, the output and the alarm marked.
    rows = [(r["step"], r.get("selected", False), r.get("alarm", False)) for r in result["evaluations"]]
    assert rows == [(0, True, False), (EVERY, False, True)] + ([(TOTAL, False, True)] if action != "stop" else [])
    assert result["evaluations"][0]["checkPassRate"] == 0.0
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["details"]["watch"]["selectedStep"] == 0
    assert manifest["details"]["watch"]["stoppedByAlarm"] is (action == "stop")

    # The output is the step-0 policy (the untrained base model), the trained one is kept beside it.
    base = load_file(volume / "assets" / "base-model" / "model.safetensors")
    kept = load_file(out_dir / "model" / "model.safetensors")
    final = load_file(out_dir / "final" / "model" / "model.safetensors")
    name = next(k for k in kept if k in base and kept[k].dtype.is_floating_point and kept[k].dim() == 2)
    assert (kept[name] - base[name]).abs().max() < 1e-6
    assert (final[name] - base[name]).abs().max() > 1e-4


def test_ppo_rollback_restores_strengthens_the_kl_and_finally_stops(volume: Path, tmp_path: Path) -> None:
    """PPO with action rollback under the same forced alarm: every evaluation after step 0 fires, so
    it rolls back twice (KL coefficient 0.3 -> 0.6 -> 1.2, fixed controller), then the third alarm
    ends training at the budget and the output is the step-0 policy. On two processes: rank 0
    evaluates and decides, both ranks put back the candidate (compared after each rollback) and
    train on together."""
    run = "watch-ppo-rollback"
    ppo = {
        "dataset": {"format": "jsonl", "path": "assets/data/prompts.jsonl", "maxSamples": 32, "evalFraction": 0.25},
        "learningRate": 1.0e-2,  # the LoRA adapter starts at zero: move it clearly in two steps
        "batchSize": 4,
        "miniBatchSize": 4,
        "ppoEpochs": 1,
        "totalSteps": 3 * EVERY,
        "responseLength": {"min": 2, "max": 12},
        "rewardModel": {"path": REWARD_MODEL},
        "watch": {
            "evalEvery": EVERY,
            "evalPrompts": 8,
            "klLimit": 1.0e-5,
            "action": "rollback",
            "preferenceSet": PAIRS,
        },
    }
    body = tiny_spec(sft={"enabled": False}, reward={"enabled": False}, ppo=ppo)
    config = write_invocation(volume, "ppo", run, body)
    code, out = run_stage("ppo", config, tmp_path / "result.json", "--nproc", "2", timeout=600)
    assert code == 0, out[-4000:]
    assert out.count("ppo watch: rollback ") == 2, "rank 0 records each rollback, once"
    result = read_result(tmp_path / "result.json")
    assert result["step"] == 3 * EVERY and len(result["findings"]) == 3, result
    assert result["selectedStep"] == 0 and "rolled back 2x, last at step 4 to step 0" in result["selection"]

    out_dir = run_dir(volume, run) / "ppo"
    records = [json.loads(line) for line in (out_dir / "evaluations.jsonl").read_text().splitlines()]
    notes = {r["step"]: r["rollback"] for r in records if "rollback" in r}
    assert all(0.0 <= r["preference_accuracy"] <= 1.0 for r in records)
    assert sorted(notes) == [2, 4] and [n["restoredStep"] for n in notes.values()] == [0, 0]
    assert [n["klCoef"] for n in notes.values()] == pytest.approx([0.6, 1.2])
    history = json.loads((out_dir / "manifest.json").read_text())["details"]["history"]
    coefs = {h["step"]: h["kl_coef"] for h in history}
    assert coefs == pytest.approx({1: 0.3, 2: 0.3, 3: 0.6, 4: 0.6, 5: 1.2, 6: 1.2})
