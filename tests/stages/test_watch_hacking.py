"""PPO against a reward model with a hole built in on purpose: the watch raises the alarm, stops, and the
output is a checkpoint from before the collapse, judged by the tiny task's ground truth.

The hole: in the reward model's preference data, every pair whose rejected answer is a cut-off
positive answer (kind ``truncated``: "the old lake is lovely and") or the empty answer is turned
around, so the reward model learns that an unfinished or empty answer beats a complete one. Such
answers fail the ground truth (no full sentence), and PPO reaches them by ending answers early: the
reward-model score rises while the answers get shorter, which is what the watch looks for.

examples/tiny.yaml's sound reward model under the same PPO raises no alarm on 3 seeds: asserted in
test_ppo_learning.py, whose runs have the default watch on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import read_result, run_dir, run_stage, tiny_spec, write_invocation

pytestmark = [pytest.mark.training, pytest.mark.timeout(2400)]

RUN = "watch-hacking"
HOLE_KINDS = ("truncated", "empty")  # the rejected kinds whose pairs are turned around
EVAL_SAMPLES = 2  # per held-out prompt (64 prompts)


def exploitable_preferences(assets: Path, out: Path) -> int:
    """The tiny preference data with the hole; returns how many pairs were turned around."""
    rows = [json.loads(line) for line in (assets / "data" / "preferences.jsonl").read_text().splitlines() if line]
    turned = 0
    for row in rows:
        if row["kind"] in HOLE_KINDS:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
            turned += 1
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return turned


def spec(action: str) -> dict[str, Any]:
    return tiny_spec(
        reward={"dataset": {"path": "hole/preferences.jsonl"}},
        ppo={"watch": {"evalEvery": 5, "evalPrompts": 32, "action": action}},
    )


@pytest.fixture(scope="module")
def hacked(workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """SFT, the exploitable reward model, then PPO + merge twice: ``warn`` (trains on to totalSteps,
    so the collapse completes) and ``stop`` (the default)."""
    (workspace / "hole").mkdir(exist_ok=True)
    assert exploitable_preferences(workspace / "assets", workspace / "hole" / "preferences.jsonl") > 200
    logs = tmp_path_factory.mktemp("watch-hacking")
    out: dict[str, Any] = {}
    for action in ("warn", "stop"):
        run = f"{RUN}-{action}"
        stages = ("sft", "reward", "ppo", "merge") if action == "warn" else ("ppo", "merge")
        if action == "stop":  # the same SFT policy and reward model
            for stage in ("sft", "reward"):
                shutil.copytree(run_dir(workspace, f"{RUN}-warn") / stage, run_dir(workspace, run) / stage)
        for stage in stages:
            config = write_invocation(workspace, stage, run, spec(action))
            code, text = run_stage(stage, config, logs / f"{run}-{stage}.json", timeout=1200)
            assert code == 0, text[-4000:]
            out[f"{action}/{stage}"] = read_result(logs / f"{run}-{stage}.json")
    return out


def ground_truth(workspace: Path, adapter: Path | None) -> dict[str, float]:
    """Target rate and mean length of the SFT model (with ``adapter``) on the held-out topics."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_stages.tiny.evaluate import evaluate_policy, load_prompts

    sft = run_dir(workspace, f"{RUN}-warn") / "sft" / "model"
    tokenizer = AutoTokenizer.from_pretrained(sft)
    policy = AutoModelForCausalLM.from_pretrained(sft)
    if adapter is not None:
        policy = PeftModel.from_pretrained(policy, adapter)
    prompts = load_prompts(workspace / "assets" / "data" / "eval_prompts.jsonl")
    summary = evaluate_policy(
        policy.eval(),
        tokenizer,
        prompts,
        seed=1234,
        samples_per_prompt=EVAL_SAMPLES,
        max_new_tokens=tiny_spec()["ppo"]["responseLength"]["max"],
    )
    return {"target_rate": summary["target_rate"], "length": summary["mean_length_tokens"]}


def alarm_step(finding: str) -> int:
    return int(finding.split(" at step ")[1].split(":", maxsplit=1)[0])


def test_warn_raises_the_alarm_trains_on_and_keeps_the_checkpoint_before_it(hacked: dict[str, Any]) -> None:
    result = hacked["warn/ppo"]
    findings = result.get("findings", [])
    assert findings and findings[0].startswith("rewardRiseWithCollapse"), result
    assert result["step"] == 40  # warn: trained on
    assert result["selectedStep"] < alarm_step(findings[0]) and "lastBeforeAlarm" in result["selection"]
    merge = hacked["warn/merge"]
    assert merge["selectedStep"] == result["selectedStep"] and f"step {result['selectedStep']}" in merge["message"]


def test_stop_ends_training_at_the_alarm(hacked: dict[str, Any]) -> None:
    warn, stop = hacked["warn/ppo"], hacked["stop/ppo"]
    first = alarm_step(warn["findings"][0])
    assert first < 40 and stop["step"] == first  # PPO is deterministic: the same alarm, then it stopped
    assert stop["findings"] == [warn["findings"][0]] and stop["selectedStep"] == warn["selectedStep"]


def test_the_kept_checkpoint_predates_the_collapse(workspace: Path, hacked: dict[str, Any]) -> None:
    ppo = run_dir(workspace, f"{RUN}-warn") / "ppo"
    sft = ground_truth(workspace, None)
    kept = ground_truth(workspace, ppo / "adapter")
    final = ground_truth(workspace, ppo / "final" / "adapter")
    records = [json.loads(line) for line in (ppo / "evaluations.jsonl").read_text().splitlines()]
    table = [{k: r[k] for k in ("step", "score_mean", "length_mean", "findings")} for r in records]
    report = {"sft": sft, "kept": kept, "final": final, "evaluations": table}
    print(json.dumps(report, indent=1))
    assert final["target_rate"] <= 0.5 * sft["target_rate"], report  # the hole was found: a collapse
    assert kept["target_rate"] >= sft["target_rate"] - 0.1, report  # the kept policy did not collapse
    assert kept["target_rate"] >= final["target_rate"] + 0.15, report
