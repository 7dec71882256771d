"""PPO learns: SFT -> reward -> PPO -> merge on the tiny assets raises the reward on unseen topics.

Measured on the HELD-OUT prompts (topics no training file contains): the reward model's score (what
PPO optimised, EOS included, missing-EOS penalty applied as in training) and the ground-truth
target check (which a policy cannot game the way it can game a reward model).

Asserted for every PPO seed (0, 1, 2) on one SFT policy and reward model trained with
examples/tiny.yaml's settings: the reward-model gain, the ground-truth gain and the EOS rate.
Seed 0 also runs on two data-parallel processes, with the same assertions. The reward and PPO
stages are seeded end to end, so identical runs on the same machine give identical models and
numbers.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import read_result, run_dir, run_stage, tiny_spec, write_invocation

# The module fixture trains the tiny SFT and reward models before the first test.
pytestmark = [pytest.mark.training, pytest.mark.timeout(2400)]

RUN = "ppo-learning"
# examples/tiny.yaml's own SFT and reward settings.
SFT: dict[str, Any] = {}
REWARD: dict[str, Any] = {}
SEEDS = [int(s) for s in os.environ.get("RLHF_PPO_TEST_SEEDS", "0,1,2").split(",")]
EVAL_SAMPLES = 4  # per held-out prompt: 64 prompts x 4

# Held-out reward-model gains (PPO - SFT) measured on fresh clones: +2.0 to +3.1 and +2.2 to +4.9.
MIN_REWARD_GAIN = 0.5
# Held-out ground-truth target-rate gains with examples/tiny.yaml's fixed KL coefficient and 4 PPO
# epochs, seeds 0/1/2: +0.149/+0.113/+0.242 (0.336 -> 0.484/0.449/0.578; reward-model gains
# +1.27/+2.29/+2.50); seed 0 on 2 processes +0.219 (0.555, reward +2.10). Runs are bit-reproducible
# on one machine (seeded reward model and PPO), so the margin leaves room for other CPUs' floating
# point, not for run-to-run noise.
MIN_TARGET_GAIN = 0.05


@pytest.fixture(scope="module")
def prerequisites(workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """sft/ and reward/ outputs for RUN: copied from test_pipeline's run when complete, else trained."""
    spec = tiny_spec(sft=SFT, reward=REWARD)
    logs = tmp_path_factory.mktemp("ppo-prereq")
    for stage in ("sft", "reward"):
        code, out = run_stage(stage, write_invocation(workspace, stage, RUN, spec), logs / f"{stage}.json", timeout=900)
        assert code == 0, out[-3000:]
    return {"spec": spec}


def _evaluate(workspace: Path, model_dir: Path) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_stages.tiny.evaluate import evaluate_policy, load_prompts

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(run_dir(workspace, RUN) / "reward" / "model")
    prompts = load_prompts(workspace / "assets" / "data" / "eval_prompts.jsonl")
    max_tokens = tiny_spec()["ppo"]["responseLength"]["max"]
    summary = evaluate_policy(
        policy,
        tokenizer,
        prompts,
        reward_model=rm,
        seed=1234,
        samples_per_prompt=EVAL_SAMPLES,
        max_new_tokens=max_tokens,
    )
    # The reward PPO maximises: the missing-EOS penalty applies to answers cut off at the budget.
    penalty = tiny_spec()["ppo"].get("missingEosPenalty", 1.0) * (1.0 - summary["eos_rate"])
    return {
        "reward": summary["reward_mean"] - penalty,
        "target_rate": summary["target_rate"],
        "eos_rate": summary["eos_rate"],
        "samples": [s["text"] for s in summary["samples"]],
    }


@pytest.mark.parametrize(("seed", "nproc"), [(s, 1) for s in SEEDS] + [(SEEDS[0], 2)])
def test_ppo_policy_beats_sft_on_held_out_prompts(
    workspace: Path, prerequisites: dict[str, Any], tmp_path: Path, seed: int, nproc: int
) -> None:
    run = f"{RUN}-s{seed}-p{nproc}"
    shutil.rmtree(run_dir(workspace, run), ignore_errors=True)
    for stage in ("sft", "reward"):
        shutil.copytree(run_dir(workspace, RUN) / stage, run_dir(workspace, run) / stage)
    spec = tiny_spec(sft=SFT, reward=REWARD, ppo={"seed": seed})
    ppo_config = write_invocation(workspace, "ppo", run, spec)
    extra = [] if nproc == 1 else ["--nproc", str(nproc)]
    code, out = run_stage("ppo", ppo_config, tmp_path / "ppo.json", *extra, timeout=900)
    assert code == 0, out[-4000:]
    result = read_result(tmp_path / "ppo.json")
    assert result["succeeded"] and result["artifactPath"] == f"runs/default/{run}/ppo"
    for key in (
        "reward_mean",
        "kl",
        "entropy",
        "clip_frac",
        "approx_kl",
        "policy_loss",
        "value_loss",
        "explained_variance",
        "kl_coef",
        "response_length",
        "eos_rate",
    ):
        assert key in result["metrics"], key
    manifest = json.loads((run_dir(workspace, run) / "ppo" / "manifest.json").read_text())
    assert manifest["details"]["processes"] == nproc
    assert manifest["details"]["valueModelInit"] == "reward model"

    code, out = run_stage("merge", write_invocation(workspace, "merge", run, spec), tmp_path / "merge.json")
    assert code == 0, out[-3000:]

    before = _evaluate(workspace, run_dir(workspace, run) / "sft" / "model")
    after = _evaluate(workspace, run_dir(workspace, run) / "merge" / "model")
    report = {"seed": seed, "nproc": nproc, "sft": before, "ppo": after}
    print(json.dumps(report, indent=1))
    (workspace / f"ppo-learning-{seed}-{nproc}.json").write_text(json.dumps(report, indent=1))
    assert after["reward"] - before["reward"] >= MIN_REWARD_GAIN, report
    # No endless repetition. Seed 0 measured 0.871 with the fixed KL (13% of its answers run past
    # the 20-token budget; the others 1.0); cut-off answers also fail the ground-truth check.
    assert after["eos_rate"] >= 0.8, report
    # The reward model rates off-topic answers like on-topic ones: only the ground truth sees drift.
    # (With the former adaptive KL the 2-process run once fell to 0.07; with the fixed KL: +0.219.)
    assert after["target_rate"] - before["target_rate"] >= MIN_TARGET_GAIN, report
