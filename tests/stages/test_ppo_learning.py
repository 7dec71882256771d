"""PPO learns: SFT -> reward -> PPO -> merge on the tiny assets raises the reward on unseen topics.

Measured on the HELD-OUT prompts (topics no training file contains): the reward model's score (what
PPO optimised, EOS included, missing-EOS penalty applied as in training) and the ground-truth
target check (which a policy cannot game the way it can game a reward model).

Asserted for every PPO seed (0, 1, 2) on one SFT policy and reward model trained with
examples/tiny.yaml's settings: the reward-model gain, the EOS rate, and that the ground truth does
not fall; the ground-truth gain itself on average over the cases (one case is too noisy a measure).
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
from tests.build_cache import cached_outputs, training_key

from conftest import read_result, run_dir, run_stage, tiny_spec, write_invocation

# The module fixture trains the tiny SFT and reward models before the first test (when not cached).
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
# on one machine (seeded reward model and PPO), but not across CPUs: on the AMD EPYC machines of
# 2026-12-01 (this one and CI alike) seed 1 gained +0.047 (0.332 -> 0.379) with a reward-model gain
# of +1.81, its answers drifting to the reward model's favourite "in my view ... quite ... and ..."
# frame. One seed's gain is also within the evaluation's noise (256 answers: a rate's standard error
# is ~0.03), so the learning claim is made on the mean over the cases; each case only must not lose.
MIN_MEAN_TARGET_GAIN = 0.08
MIN_CASE_TARGET_GAIN = 0.0


@pytest.fixture(scope="module")
def prerequisites(workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """sft/ and reward/ outputs for RUN, trained once per machine (tests/build_cache.py): this module
    is about what PPO does with them; SFT and reward training are tested on their own."""
    spec = tiny_spec(sft=SFT, reward=REWARD)
    logs = tmp_path_factory.mktemp("ppo-prereq")

    def train() -> None:
        for stage in ("sft", "reward"):
            config = write_invocation(workspace, stage, RUN, spec)
            code, out = run_stage(stage, config, logs / f"{stage}.json", timeout=900)
            assert code == 0, out[-3000:]

    key = training_key(workspace / "assets", {"run": RUN, "spec": spec})
    cached_outputs("ppo-learning-base", key, run_dir(workspace, RUN), train)
    train()  # exits at once for complete outputs of these settings, trains otherwise
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


@pytest.fixture(scope="module")
def sft_evaluation(workspace: Path, prerequisites: dict[str, Any]) -> dict[str, Any]:
    """The SFT policy every case starts from, evaluated once: each case's sft/ is a copy of it and the
    evaluation is seeded, so evaluating it again per case gave the same numbers four times over."""
    return _evaluate(workspace, run_dir(workspace, RUN) / "sft" / "model")


CASES = [(s, 1) for s in SEEDS] + [(SEEDS[0], 2)]


def _train(workspace: Path, logs: Path, seed: int, nproc: int) -> dict[str, Any]:
    """PPO, then merge, for one case in its own run (sft/ and reward/ copied from RUN)."""
    run = f"{RUN}-s{seed}-p{nproc}"
    shutil.rmtree(run_dir(workspace, run), ignore_errors=True)
    for stage in ("sft", "reward"):
        shutil.copytree(run_dir(workspace, RUN) / stage, run_dir(workspace, run) / stage)
    spec = tiny_spec(sft=SFT, reward=REWARD, ppo={"seed": seed})
    extra = [] if nproc == 1 else ["--nproc", str(nproc)]
    trained: dict[str, Any] = {"run": run, "logs": logs}
    trained["ppo"] = run_stage(
        "ppo", write_invocation(workspace, "ppo", run, spec), logs / "ppo.json", *extra, timeout=900
    )
    if trained["ppo"][0] == 0:
        trained["merge"] = run_stage("merge", write_invocation(workspace, "merge", run, spec), logs / "merge.json")
    return trained


@pytest.fixture(scope="module")
def trained(
    workspace: Path, prerequisites: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[int, int], dict[str, Any]]:
    """Every case's PPO and merge processes, the cases side by side: each PPO process is seeded and
    single-threaded (two for the 2-process case), so running them together gives the models each
    gives alone while both cores work; the tests below check them one by one."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(CASES)) as pool:
        futures = {
            case: pool.submit(_train, workspace, tmp_path_factory.mktemp(f"ppo-s{case[0]}-p{case[1]}"), *case)
            for case in CASES
        }
        return {case: future.result() for case, future in futures.items()}


@pytest.mark.parametrize(("seed", "nproc"), CASES)
def test_ppo_policy_beats_sft_on_held_out_prompts(
    workspace: Path,
    trained: dict[tuple[int, int], dict[str, Any]],
    sft_evaluation: dict[str, Any],
    seed: int,
    nproc: int,
) -> None:
    case = trained[(seed, nproc)]
    run, logs = case["run"], case["logs"]
    code, out = case["ppo"]
    assert code == 0, out[-4000:]
    result = read_result(logs / "ppo.json")
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
    # The sound reward model raises no reward-hacking alarm (the default watch: every 10 steps), and
    # the output is the final policy (docs/watch.md; the exploitable one: test_watch_hacking.py).
    watched = manifest["details"]["watch"]
    assert "findings" not in result and watched["findings"] == [], watched
    assert [e["step"] for e in watched["evaluations"]] == [0, 10, 20, 30, 40]
    assert result["selectedStep"] == 40 and not (run_dir(workspace, run) / "ppo" / "final").exists()
    assert manifest["details"]["valueModelInit"] == "reward model"

    code, out = case["merge"]
    assert code == 0, out[-3000:]

    before = sft_evaluation
    after = _evaluate(workspace, run_dir(workspace, run) / "merge" / "model")
    report = {"seed": seed, "nproc": nproc, "sft": before, "ppo": after, "watch": watched["evaluations"]}
    print(json.dumps(report, indent=1))
    (workspace / f"ppo-learning-{seed}-{nproc}.json").write_text(json.dumps(report, indent=1))
    assert after["reward"] - before["reward"] >= MIN_REWARD_GAIN, report
    # No endless repetition. Seed 0 measured 0.871 with the fixed KL (13% of its answers run past
    # the 20-token budget; the others 1.0); cut-off answers also fail the ground-truth check.
    assert after["eos_rate"] >= 0.8, report
    # The reward model rates off-topic answers like on-topic ones: only the ground truth sees drift.
    # (With the former adaptive KL the 2-process run once fell to 0.07; with the fixed KL: +0.219.)
    assert after["target_rate"] - before["target_rate"] >= MIN_CASE_TARGET_GAIN, report
    TARGET_GAINS[(seed, nproc)] = after["target_rate"] - before["target_rate"]


# Each case's ground-truth gain, filled by the case's test (they run first, in this file's order).
TARGET_GAINS: dict[tuple[int, int], float] = {}


def test_ppo_raises_the_ground_truth_on_average_over_the_cases() -> None:
    """The learning claim: on unseen topics PPO's policies meet the task's target more often than
    the SFT policy they started from, by MIN_MEAN_TARGET_GAIN on average over the seeds and the
    2-process case (one case alone is too noisy a measure: see MIN_MEAN_TARGET_GAIN)."""
    assert len(TARGET_GAINS) == len(CASES), f"every case's test must pass first: {TARGET_GAINS}"
    mean = sum(TARGET_GAINS.values()) / len(TARGET_GAINS)
    print(f"ground-truth target-rate gains: {TARGET_GAINS}, mean {mean:+.3f}")
    assert mean >= MIN_MEAN_TARGET_GAIN, TARGET_GAINS
