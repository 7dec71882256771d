"""GRPO and RLOO learn the target behaviour: the stage of examples/tiny-grpo.yaml / tiny-rloo.yaml,
3 seeds each, against the SFT policy.

The reward model that trains the policy (the base run's) also judges it here, so the ground-truth
check is what shows the policy improved rather than exploited the reward model. The numbers are
printed (``-s``) and are the ones in docs/methods.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from methods_support import (
    MethodRun,
    ensure_base,
    methods_workspace,
    run_dir,
    run_methods,
    sft_evaluation,
    summary_line,
)

pytestmark = pytest.mark.training

SEEDS = (0, 1, 2)
METHODS = ("GRPO", "RLOO")
# Margins over the SFT policy that every seed of both methods cleared with room (docs/methods.md:
# the smallest gains measured were reward +3.47 and target rate +0.43).
REWARD_MARGIN = 1.5
TARGET_RATE_MARGIN = 0.25


@pytest.fixture(scope="module")
def volume(workspace: Path) -> Path:
    return methods_workspace(workspace)


@pytest.fixture(scope="module", params=METHODS)
def runs(request: pytest.FixtureRequest, volume: Path) -> tuple[str, list[MethodRun]]:
    method: str = request.param
    stage = method.lower()
    ensure_base(volume)
    sft = sft_evaluation(volume)
    out = run_methods(volume, method, stage, {seed: {stage: {"seed": seed}} for seed in SEEDS})
    for run in out:
        print(summary_line(method, sft, run))
    return method, out


def test_beats_sft_on_reward_model_and_ground_truth(volume: Path, runs: tuple[str, list[MethodRun]]) -> None:
    """Every seed: the reward model scores the policy higher *and* more answers meet the target."""
    method, method_runs = runs
    sft = sft_evaluation(volume)
    for r in method_runs:
        e = r.evaluation
        assert e.reward_mean > sft.reward_mean + REWARD_MARGIN, (method, r.seed, e, sft)
        assert e.target_rate > sft.target_rate + TARGET_RATE_MARGIN, (method, r.seed, e, sft)
        # Scored with EOS and penalised without it: the policy keeps ending its answers.
        assert e.eos_rate >= 0.9, (method, r.seed, e)


def test_the_default_watch_raises_no_alarm_on_a_sound_reward_model(runs: tuple[str, list[MethodRun]]) -> None:
    """Issue 13's "no false alarm on 3 seeds" for GRPO and RLOO: these runs have the default watch on
    (evaluations every 10 steps, action stop) and a reward model without a hole (docs/watch.md)."""
    method, method_runs = runs
    for r in method_runs:
        result = r.stage.result
        assert result.get("findings", []) == [], (method, r.seed, result.get("findings"))
        assert result["step"] == result["totalSteps"], (method, r.seed)  # not stopped by an alarm
        assert "no alarm, the final policy" in (result.get("selection") or ""), (method, r.seed, result)


def test_metrics_and_output(volume: Path, runs: tuple[str, list[MethodRun]]) -> None:
    method, method_runs = runs
    stage = method.lower()
    for r in method_runs:
        metrics = r.stage.result["metrics"]
        assert {"reward_mean", "kl", "eval_reward_mean", "eval_eos_rate"} <= set(metrics), metrics
        stage_dir = run_dir(volume, f"{stage}-{stage}-s{r.seed}") / stage
        # All weights (lora.enabled false): a complete model, no adapter for merge to fold in.
        assert (stage_dir / "model" / "config.json").is_file() and (stage_dir / "model" / "tokenizer.json").is_file()
        assert not (stage_dir / "adapter").exists()
        manifest = json.loads((stage_dir / "manifest.json").read_text())
        assert manifest["details"]["rewardScoredWithEos"] is True
        assert manifest["inputs"]["policy"] == f"runs/default/{stage}-{stage}-s{r.seed}/sft/model"
        assert manifest["inputs"]["rewardModel"].endswith("/reward/model")


def test_reward_function_scores_the_eos_and_penalises_its_absence(volume: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_stages.methods.policy_rl import RewardModelReward
    from rlhf_stages.sampling.score import score_with_reward_model

    ensure_base(volume)
    path = run_dir(volume, "methods-base") / "reward" / "model"
    model, tokenizer = AutoModelForSequenceClassification.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    eos = tokenizer.eos_token_id
    prompt, text = "Question: how is the old lake?\n\nAnswer:", " the old lake is lovely and calm."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    reward = RewardModelReward(model, tokenizer, {eos}, missing_eos_penalty=1.0)
    ended, cut = reward([prompt, prompt], [text, text], [[*ids, eos], ids])
    with_eos, without_eos = score_with_reward_model(
        model, tokenizer, [prompt, prompt], [text, text], ended_with_eos=[True, False]
    )
    assert ended == pytest.approx(with_eos) and cut == pytest.approx(without_eos - 1.0)
    assert with_eos != pytest.approx(without_eos)  # the EOS token is part of what is scored
