"""DPO learns the target behaviour: examples/tiny-dpo.yaml's DPO stage, 3 seeds, against the SFT policy.

The policies are judged on the held-out prompts (unseen topics) by the independent reward model of
the base run and by the ground-truth check (methods_support). The numbers are printed (``-s``) and
are the ones in docs/methods.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from methods_support import (
    ensure_base,
    methods_workspace,
    run_dir,
    run_method,
    run_methods,
    sft_evaluation,
    summary_line,
)

pytestmark = pytest.mark.training

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def volume(workspace: Path) -> Path:
    return methods_workspace(workspace)


@pytest.fixture(scope="module")
def dpo_runs(volume: Path) -> list[Any]:
    workspace = volume
    ensure_base(workspace)
    sft = sft_evaluation(workspace)
    runs = run_methods(workspace, "DPO", "dpo", {seed: {"dpo": {"training": {"seed": seed}}} for seed in SEEDS})
    for run in runs:
        print(summary_line("DPO", sft, run))
    return runs


def test_dpo_beats_sft_on_held_out_prompts(volume: Path, dpo_runs: list[Any]) -> None:
    sft = sft_evaluation(volume)
    for r in dpo_runs:
        e = r.evaluation
        assert e.reward_mean > sft.reward_mean + 0.5, (r.seed, e, sft)
        # Ground truth: far fewer answers with more negative than positive words ...
        assert e.not_positive_rate < sft.not_positive_rate - 0.15, (r.seed, e, sft)
        assert e.eos_rate >= 0.9
    # ... and more answers meeting the whole target (naming the unseen topic is the limiting part).
    mean = {
        k: sum(getattr(r.evaluation, k) for r in dpo_runs) / len(dpo_runs) for k in ("target_rate", "ground_truth_mean")
    }
    assert mean["target_rate"] > sft.target_rate, mean
    assert mean["ground_truth_mean"] > sft.ground_truth_mean, mean


def test_dpo_metrics_and_output(volume: Path, dpo_runs: list[Any]) -> None:
    for r in dpo_runs:
        metrics = r.stage.result["metrics"]
        # The implicit reward beta * log(pi/ref) ranks held-out pairs, and the policy still ends answers.
        assert metrics["eval_preference_accuracy"] >= 0.85, metrics
        assert metrics["eval_reward_margin"] > 0
        assert metrics["eval_eos_rate"] >= 0.9
        stage_dir = run_dir(volume, f"dpo-dpo-s{r.seed}") / "dpo"
        assert (stage_dir / "model" / "config.json").is_file() and (stage_dir / "model" / "tokenizer.json").is_file()
        manifest = json.loads((stage_dir / "manifest.json").read_text())
        assert manifest["inputs"]["policy"] == f"runs/default/dpo-dpo-s{r.seed}/sft/model"
        assert manifest["details"]["reference"] == "frozen copy of the policy"


def test_dpo_with_lora_uses_the_disabled_adapter_as_reference(volume: Path) -> None:
    """The default (LoRA): a few steps of the hinge variant leave an adapter that merge can fold in."""
    ensure_base(volume)
    changes = {
        "dpo": {
            "lora": {"enabled": True, "r": 4, "alpha": 8},
            "beta": 0.2,
            "lossType": "hinge",
            "training": {"maxSteps": 3, "learningRate": 1e-3},
        }
    }
    r = run_method(volume, "DPO", "dpo", 99, changes)
    stage_dir = run_dir(volume, "dpo-dpo-s99") / "dpo"
    assert (stage_dir / "adapter" / "adapter_config.json").is_file()
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    assert manifest["details"]["reference"] == "policy with the adapter disabled"
    assert manifest["details"]["lossType"] == "hinge" and r.stage.result["step"] == 3
