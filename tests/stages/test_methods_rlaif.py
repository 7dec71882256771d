"""RLAIF learns the target behaviour from a judge, not from labels: examples/tiny-rlaif.yaml, 3 seeds.

A tiny judge (rlhf_stages.tiny.judge, trained on the tiny preference pairs under the constitution
of the example, once per machine: tests/build_cache.py) labels pairs of the SFT policy's own
answers; DPO trains on those labels. The policies are judged like every method (methods_support):
on the held-out prompts (unseen topics) by the base run's independent reward model and by the
ground-truth check. The numbers are printed (``-s``) and are the ones in docs/methods.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from methods_support import (
    ensure_base,
    ensure_judge,
    example_spec,
    link_base,
    merge_into,
    methods_workspace,
    run_dir,
    run_methods,
    run_stage,
    sft_evaluation,
    summary_line,
)

# The first test trains the tiny judge when the build cache has none for this code (any change under
# stages/ is a new key): about 150 s alone, but beyond 900 s beside the suite's other parts on 2 cores
# (the CI run of 2026-12-01 timed out in it).
pytestmark = [pytest.mark.training, pytest.mark.timeout(2400)]

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def volume(workspace: Path) -> Path:
    return methods_workspace(workspace)


@pytest.fixture(scope="module")
def judge_report(volume: Path) -> dict[str, Any]:
    ensure_base(volume)
    report = ensure_judge(volume)
    print(f"tiny judge: {report}")
    return report


@pytest.fixture(scope="module")
def rlaif_runs(volume: Path, judge_report: dict[str, Any]) -> list[Any]:
    sft = sft_evaluation(volume)
    changes = {seed: {"rlaif": {"seed": seed}, "dpo": {"training": {"seed": seed}}} for seed in SEEDS}
    runs = run_methods(volume, "RLAIF", "dpo", changes, before=("rlaif",))
    for run in runs:
        labelling = run.extra["rlaif"]
        print(
            f"RLAIF labelling seed {run.seed}: {labelling.seconds:.0f} s, peak RSS {labelling.peak_rss_mib:.0f} MiB, "
            f"{labelling.result['metrics']}"
        )
        print(summary_line("RLAIF", sft, run))
    return runs


def test_tiny_judge_ranks_unseen_pairs(judge_report: dict[str, Any]) -> None:
    """The judge itself: held-out pairs (unseen topics, both orders averaged) mostly right."""
    held_out = judge_report["held_out"]
    # Measured with judge seeds 0/1/2: accuracy 0.91/0.92/0.91, agreement 0.90/0.92/0.91.
    assert held_out["pair_accuracy"] >= 0.85, judge_report
    assert held_out["agreement_rate"] >= 0.8, judge_report
    assert 0.35 <= held_out["first_position_rate"] <= 0.65, judge_report  # no strong position bias


def test_rlaif_dpo_beats_sft_on_held_out_prompts(volume: Path, rlaif_runs: list[Any]) -> None:
    sft = sft_evaluation(volume)
    for r in rlaif_runs:
        e = r.evaluation
        assert e.reward_mean > sft.reward_mean + 0.5, (r.seed, e, sft)
        # Ground truth, on every seed: more answers meet the whole target, far fewer are not positive.
        assert e.target_rate > sft.target_rate + 0.1, (r.seed, e, sft)
        assert e.not_positive_rate < sft.not_positive_rate - 0.15, (r.seed, e, sft)
        assert e.eos_rate >= 0.9, (r.seed, e)


def test_rlaif_stage_leaves_pairs_verdicts_and_metrics(volume: Path, rlaif_runs: list[Any]) -> None:
    constitution = example_spec("RLAIF")["rlaif"]["constitution"]
    for r in rlaif_runs:
        out = run_dir(volume, f"rlaif-dpo-s{r.seed}") / "rlaif"
        metrics = r.extra["rlaif"].result["metrics"]
        pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
        verdicts = [json.loads(line) for line in (out / "verdicts.jsonl").read_text().splitlines()]
        assert len(pairs) == metrics["pairs_labelled"] > 100
        assert len(verdicts) == metrics["pairs_judged"] >= len(pairs)
        assert sum(v["kept"] for v in verdicts) == len(pairs)
        assert all(p["chosen"] != p["rejected"] and p["preference"] > 0.5 for p in pairs)
        # Both orders were asked: the agreement rate is a real filter, and it is reported.
        assert 0.0 < metrics["agreement_rate"] < 1.0
        assert all(v["p_x_shown_second"] is not None for v in verdicts)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["details"]["constitution"] == constitution
        assert manifest["inputs"]["judge"] == "assets/judge"
        dpo = json.loads((out.parent / "dpo" / "manifest.json").read_text())
        assert dpo["inputs"]["dataset"].endswith("rlaif/pairs.jsonl")
        assert dpo["inputs"]["trainPairs"] + dpo["inputs"]["evalPairs"] == len(pairs)


def test_rlaif_labels_train_a_reward_model_that_agrees_with_ground_truth(
    volume: Path, judge_report: dict[str, Any]
) -> None:
    """rlaif.then PPO: the reward stage trains on the judge's labels only. Scored on held-out pairs built
    from the known target behaviour (unseen topics), it ranks the sentiment contrasts, which the SFT
    policy's own answers contain, almost always right. The kinds of bad answer the policy never
    produces (empty, word salad, ...) are never labelled, so there it is weaker (measured 0.43-0.79
    against 0.59-1.0 for the reward model trained on the human-style pairs): reported per kind."""
    from collections import defaultdict

    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_stages.methods.reward import pair_texts, score_ids, tokenize_pairs
    from rlhf_stages.tiny.assets import read_jsonl

    run = "rlaif-reward"
    link_base(volume, run, stages=("sft",))
    base = example_spec("base")
    spec = merge_into(
        example_spec("RLAIF"),
        {
            "rlaif": {"then": "PPO"},
            "dpo": None,
            "reward": {k: v for k, v in base["reward"].items() if k != "dataset"} | {"promptTemplate": "{prompt}"},
            "ppo": base["ppo"],
        },
    )
    spec["reward"]["training"] = spec["reward"]["training"] | {"maxSteps": 150, "saveSteps": 1000}
    for stage in ("rlaif", "reward"):
        done = run_stage(volume, stage, run, spec)
        assert done.code == 0, done.output
    manifest = json.loads((run_dir(volume, run) / "reward" / "manifest.json").read_text())
    assert manifest["inputs"]["dataset"].endswith("rlaif/pairs.jsonl")

    model_dir = run_dir(volume, run) / "reward" / "model"
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = read_jsonl(volume / "assets" / "data" / "preferences_eval.jsonl")
    pairs, dropped = tokenize_pairs(pair_texts(Dataset.from_list(rows), "{prompt}"), tokenizer, 512)
    assert dropped == 0
    chosen = score_ids(model, pairs["chosen_ids"], tokenizer.pad_token_id)
    rejected = score_ids(model, pairs["rejected_ids"], tokenizer.pad_token_id)
    right: dict[str, list[bool]] = defaultdict(list)
    for row, c, r in zip(rows, chosen, rejected, strict=True):
        right[row["kind"]].append(c > r)
    by_kind = {kind: sum(v) / len(v) for kind, v in sorted(right.items())}
    overall = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(rows)
    print(f"RLAIF reward model: ground-truth pair accuracy {overall:.3f}, by kind {by_kind}; {done.result['metrics']}")
    assert by_kind["negative"] >= 0.9 and by_kind["mixed"] >= 0.9, by_kind
    assert overall >= 0.65, by_kind


def test_constitution_from_a_config_map(volume: Path, judge_report: dict[str, Any], tmp_path: Path) -> None:
    """constitutionConfigMap: the stage reads the mounted file; unmounted, it stops naming the field."""
    run = "rlaif-configmap"
    link_base(volume, run, stages=("sft",))
    spec = merge_into(
        example_spec("RLAIF"),
        {"rlaif": {"constitution": None, "constitutionConfigMap": "house-rules", "dataset": {"maxSamples": 16}}},
    )
    missing = run_stage(volume, "rlaif", run, spec, extra_env={"RLHF_CONSTITUTION_FILE": str(tmp_path / "absent")})
    assert missing.code == 3, missing.output
    assert "rlaif.constitutionConfigMap" in missing.output and "RLHF_CONSTITUTION_FILE" in missing.output
    assert not (run_dir(volume, run) / "rlaif").exists()

    principles = ["Be positive about the asked topic.", "End the sentence; never repeat."]
    rules = tmp_path / "constitution"
    rules.write_text("# as in the ConfigMap\n" + "".join(f"{p}\n" for p in principles))
    done = run_stage(volume, "rlaif", run, spec, extra_env={"RLHF_CONSTITUTION_FILE": str(rules)})
    assert done.code == 0, done.output
    manifest = json.loads((run_dir(volume, run) / "rlaif" / "manifest.json").read_text())
    assert manifest["details"]["constitution"] == principles
    assert manifest["inputs"]["prompts"] == 16
