"""The PPO stage as the operator runs it: config errors, SIGTERM checkpoint, exact resume, output layout.

The policy and reward model are stand-ins (the untrained tiny base model, and the same checkpoint
as a scorer): these tests are about the stage's mechanics, test_ppo_learning.py about learning.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import read_result, run_dir, run_stage, start_stage, tiny_spec, write_invocation

pytestmark = pytest.mark.training

# Small and quick: 6 steps of 8 rollouts, a checkpoint every 2 steps.
PPO = {
    "batchSize": 8,
    "miniBatchSize": 4,
    "ppoEpochs": 1,
    "totalSteps": 6,
    "saveFreq": 2,
    "responseLength": {"min": 3, "max": 6},
    "dataset": {"maxSamples": 64},
}
SLOW = {"RLHF_DEBUG_STEP_DELAY_S": "1.0"}


def _spec(**ppo: Any) -> dict[str, Any]:
    return tiny_spec(ppo=PPO | ppo)


def _prepare(workspace: Path, run: str) -> None:
    """sft/model = the tiny base model, reward/model = the same weights read as a scorer."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    shutil.rmtree(run_dir(workspace, run), ignore_errors=True)
    base = workspace / "assets" / "base-model"
    shutil.copytree(base, run_dir(workspace, run) / "sft" / "model")
    torch.manual_seed(0)  # the score head is new: the same one in every run
    rm = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    rm.save_pretrained(run_dir(workspace, run) / "reward" / "model")
    AutoTokenizer.from_pretrained(base).save_pretrained(run_dir(workspace, run) / "reward" / "model")
    for stage in ("sft", "reward"):  # complete outputs, as the stages would have committed them
        manifest = {"completed": True, "outputId": f"{run}-{stage}"}
        (run_dir(workspace, run) / stage / "manifest.json").write_text(json.dumps(manifest))


def _adapter_weights(workspace: Path, run: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(run_dir(workspace, run) / "ppo" / "adapter" / "adapter_model.safetensors")


def _wait_for(predicate, proc: subprocess.Popen[str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"stage exited early ({proc.returncode}): {proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the stage")
        time.sleep(0.1)


def test_generation_extra_may_not_override_the_rollout(workspace: Path, tmp_path: Path) -> None:
    run = "ppo-bad-extra"
    _prepare(workspace, run)
    spec = _spec(generation={"extra": {"max_new_tokens": 100, "repetition_penalty": 1.2}})
    code, out = run_stage("ppo", write_invocation(workspace, "ppo", run, spec), tmp_path / "r.json")
    assert code == 2, out[-2000:]
    assert "max_new_tokens" in read_result(tmp_path / "r.json")["message"]


def test_missing_reward_model_is_an_input_error(workspace: Path, tmp_path: Path) -> None:
    run = "ppo-no-reward"
    _prepare(workspace, run)
    shutil.rmtree(run_dir(workspace, run) / "reward")
    code, out = run_stage("ppo", write_invocation(workspace, "ppo", run, _spec()), tmp_path / "r.json")
    assert code == 3, out[-2000:]


def test_incomplete_sft_output_is_an_input_error(workspace: Path, tmp_path: Path) -> None:
    """Like dpo, grpo and rest: sft/model without a committed manifest is a killed SFT, not an input."""
    run = "ppo-sft-incomplete"
    _prepare(workspace, run)
    (run_dir(workspace, run) / "sft" / "manifest.json").unlink()
    code, out = run_stage("ppo", write_invocation(workspace, "ppo", run, _spec()), tmp_path / "r.json")
    assert code == 3, out[-2000:]
    assert "sft/manifest.json" in read_result(tmp_path / "r.json")["message"]


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_equals_an_uninterrupted_one(
    workspace: Path, tmp_path: Path
) -> None:
    # extra kwargs reach generate(); the watch evaluates at steps 0, 2, 4, 6, across the interruption
    # (warn: an alarm on this untrained reward model must not end the run this test compares).
    spec = _spec(
        generation={"extra": {"repetition_penalty": 1.1}}, watch={"evalEvery": 2, "evalPrompts": 8, "action": "warn"}
    )

    straight = "ppo-straight"
    _prepare(workspace, straight)
    code, out = run_stage("ppo", write_invocation(workspace, "ppo", straight, spec), tmp_path / "a.json")
    assert code == 0, out[-3000:]
    manifest = json.loads((run_dir(workspace, straight) / "ppo" / "manifest.json").read_text())
    assert manifest["completed"] and manifest["step"] == 6 and len(manifest["details"]["history"]) == 6
    for step in manifest["details"]["history"]:  # where each step's time went: three phases within the step
        phases = [step[k] for k in ("sampling_seconds", "scoring_seconds", "update_seconds")]
        assert all(p > 0 for p in phases) and sum(phases) <= step["step_seconds"], step
    assert (run_dir(workspace, straight) / "ppo" / "adapter" / "tokenizer.json").is_file()
    adapter_config = json.loads((run_dir(workspace, straight) / "ppo" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == f"runs/default/{straight}/sft/model"
    progress = json.loads((run_dir(workspace, straight) / "ppo.progress.json").read_text())
    assert progress["step"] == 6 and "reward_mean" in progress["metrics"]
    assert not (run_dir(workspace, straight) / "ppo.checkpoints").exists()

    run = "ppo-interrupted"
    _prepare(workspace, run)
    config = write_invocation(workspace, "ppo", run, spec)
    checkpoints = run_dir(workspace, run) / "ppo.checkpoints"
    proc = start_stage("ppo", config, tmp_path / "b.json", **SLOW)
    _wait_for((checkpoints / "checkpoint-2").is_dir, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out[-3000:]
    result = read_result(tmp_path / "b.json")
    stopped = result["step"]
    assert not result["succeeded"] and "SIGTERM" in result["message"] and 2 <= stopped < 6
    assert (checkpoints / f"checkpoint-{stopped}" / "state.json").is_file()
    assert not (run_dir(workspace, run) / "ppo").exists()
    debris = checkpoints / ".incoming" / "checkpoint-5"
    debris.mkdir(parents=True)  # what a kill mid-save leaves: ignored, removed

    code, out = run_stage("ppo", config, tmp_path / "c.json")
    assert code == 0, out[-3000:]
    assert f"resuming ppo from checkpoint-{stopped}" in out
    assert not debris.exists()
    resumed = json.loads((run_dir(workspace, run) / "ppo" / "manifest.json").read_text())
    assert resumed["details"]["resumedFromStep"] == stopped and resumed["step"] == 6
    # Weights, optimizer, KL controller and every RNG were restored: the same run, bit for bit.
    assert [h["reward_mean"] for h in resumed["details"]["history"]] == [
        h["reward_mean"] for h in manifest["details"]["history"]
    ]
    a, b = _adapter_weights(workspace, straight), _adapter_weights(workspace, run)
    assert set(a) == set(b) and all(bool((a[k] == b[k]).all()) for k in a)
    # The evaluation log too: the resumed run kept the records up to its checkpoint and added the same ones.
    log_a, log_b = ((run_dir(workspace, r) / "ppo" / "evaluations.jsonl").read_text() for r in (straight, run))
    assert [json.loads(line)["step"] for line in log_a.splitlines()] == [0, 2, 4, 6] and log_a == log_b

    # Evaluating changes nothing about training (the training RNG is restored after each evaluation).
    unwatched = "ppo-unwatched"
    _prepare(workspace, unwatched)
    quiet = _spec(generation={"extra": {"repetition_penalty": 1.1}}, watch={"evalEvery": 0})
    code, out = run_stage("ppo", write_invocation(workspace, "ppo", unwatched, quiet), tmp_path / "d.json")
    assert code == 0, out[-3000:]
    plain = json.loads((run_dir(workspace, unwatched) / "ppo" / "manifest.json").read_text())
    assert [h["reward_mean"] for h in plain["details"]["history"]] == [
        h["reward_mean"] for h in manifest["details"]["history"]
    ]
    assert (
        plain["details"]["watch"] is None and not (run_dir(workspace, unwatched) / "ppo" / "evaluations.jsonl").exists()
    )
