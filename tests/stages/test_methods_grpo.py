"""GRPO learns against the reward model: examples/tiny-grpo.yaml's GRPO stage, 3 seeds, against SFT.

The reward model that trains the policy (the base run's) also judges it here, so the ground-truth
check is what shows the policy improved rather than exploited the reward model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from methods_support import ensure_base, methods_workspace, run_dir, run_method, sft_evaluation, summary_line

pytestmark = pytest.mark.training

SEEDS = (0, 1, 2)
METHOD, STAGE = "GRPO", "grpo"


@pytest.fixture(scope="module")
def volume(workspace: Path) -> Path:
    return methods_workspace(workspace)


@pytest.fixture(scope="module")
def runs(volume: Path) -> list[Any]:
    ensure_base(volume)
    sft = sft_evaluation(volume)
    out = []
    for seed in SEEDS:
        out.append(run_method(volume, METHOD, STAGE, seed, {STAGE: {"seed": seed}}))
        print(summary_line(METHOD, sft, out[-1]))
    return out


def test_raises_the_reward_model_score_on_held_out_prompts(volume: Path, runs: list[Any]) -> None:
    """On average over the seeds; single seeds of this short run (30 steps) can end below SFT."""
    sft = sft_evaluation(volume)
    mean_reward = sum(r.evaluation.reward_mean for r in runs) / len(runs)
    assert mean_reward > sft.reward_mean + 0.1, (mean_reward, sft)
    for r in runs:
        # Scored with EOS and penalised without it: the policy keeps ending its answers.
        assert r.evaluation.eos_rate >= 0.9, (r.seed, r.evaluation)


def test_metrics_and_output(volume: Path, runs: list[Any]) -> None:
    for r in runs:
        metrics = r.stage.result["metrics"]
        assert {"reward_mean", "kl", "eval_reward_mean", "eval_eos_rate"} <= set(metrics), metrics
        stage_dir = run_dir(volume, f"{METHOD.lower()}-{STAGE}-s{r.seed}") / STAGE
        assert (stage_dir / "adapter" / "adapter_config.json").is_file()
        manifest = json.loads((stage_dir / "manifest.json").read_text())
        assert manifest["details"]["rewardScoredWithEos"] is True
        assert manifest["inputs"]["rewardModel"].endswith("/reward/model")


def test_reward_function_scores_the_eos_and_penalises_its_absence(volume: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_stages.evaluation import score_with_reward_model
    from rlhf_stages.policy_rl import RewardModelReward

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
