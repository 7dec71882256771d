"""Evaluation of a policy on the tiny synthetic task (see ``assets``).

Two independent signals:

* the **ground truth** (``ground_truth``): a program that knows the target
  behaviour, which cannot be gamed the way a learned reward model can;
* the **reward model** score (``sampling.score``), i.e. what RL optimised.

A policy that raises the reward but not the ground-truth target rate has
found a hole in the reward model; tests should look at both.

CLI::

    python -m rlhf_stages.tiny.evaluate --policy PATH [--reward-model PATH] \\
        --prompts FILE [--tokenizer PATH] [--max-new-tokens N] [--seed S] \\
        [--greedy] [--json OUT]

``FILE`` is jsonl with a ``prompt`` column (already formatted with the prompt
template) or a ``question`` column (formatted here with ``--template``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rlhf_stages.sampling.generate import generate_completions, load_policy
from rlhf_stages.sampling.score import score_with_reward_model
from rlhf_stages.tiny.assets import DEFAULT_PROMPT_TEMPLATE, format_prompt, read_jsonl
from rlhf_stages.tiny.ground_truth import check_target, ground_truth_score


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _std(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def evaluate_policy(
    policy: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    reward_model: Any | None = None,
    reward_tokenizer: Any | None = None,
    max_new_tokens: int = 32,
    seed: int = 0,
    greedy: bool = False,
    temperature: float = 1.0,
    samples_per_prompt: int = 1,
    batch_size: int = 32,
    num_examples: int = 5,
) -> dict[str, Any]:
    """Generate for every prompt and summarise (JSON-serialisable dict).

    Keys: ``num_prompts``, ``num_completions``, ``reward_mean``,
    ``reward_std`` (None without a reward model), ``target_rate``,
    ``ground_truth_mean``, ``eos_rate``, ``mean_length_tokens``,
    ``mean_length_words``, ``unique_completion_rate``, ``failure_rates``
    (fraction failing each criterion) and ``samples`` (the first
    ``num_examples`` completions with their scores).
    """
    all_prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    completions = generate_completions(
        policy,
        tokenizer,
        all_prompts,
        max_new_tokens,
        seed,
        greedy=greedy,
        temperature=temperature,
        batch_size=batch_size,
    )
    checks = [check_target(c.text, c.prompt) for c in completions]
    gt_scores = [ground_truth_score(c.text, c.prompt) for c in completions]
    rewards: list[float] | None = None
    if reward_model is not None:
        rewards = score_with_reward_model(
            reward_model,
            reward_tokenizer if reward_tokenizer is not None else tokenizer,
            all_prompts,
            completions,
            batch_size=batch_size,
        )
    n = len(completions)
    failure_counts: Counter[str] = Counter(f for c in checks for f in c.failures())
    samples = [
        {
            **asdict(c),
            "meets_target": chk.meets_target,
            "ground_truth": gt,
            "reward": None if rewards is None else rewards[i],
        }
        for i, (c, chk, gt) in enumerate(zip(completions, checks, gt_scores, strict=True))
    ][:num_examples]
    return {
        "num_prompts": len(prompts),
        "num_completions": n,
        "reward_mean": None if rewards is None else _mean(rewards),
        "reward_std": None if rewards is None else _std(rewards),
        "target_rate": _mean([float(c.meets_target) for c in checks]),
        "ground_truth_mean": _mean(gt_scores),
        "eos_rate": _mean([float(c.ended_with_eos) for c in completions]),
        "mean_length_tokens": _mean([float(c.num_tokens) for c in completions]),
        "mean_length_words": _mean([float(c.num_words) for c in checks]),
        "unique_completion_rate": len({c.text for c in completions}) / n if n else float("nan"),
        "failure_rates": {k: v / n for k, v in sorted(failure_counts.items())},
        "samples": samples,
    }


def load_prompts(path: Path, template: str = DEFAULT_PROMPT_TEMPLATE, limit: int | None = None) -> list[str]:
    """Prompts from jsonl: the ``prompt`` column, else ``question`` formatted with ``template``."""
    prompts: list[str] = []
    for row in read_jsonl(path):
        if "prompt" in row:
            prompts.append(str(row["prompt"]))
        elif "question" in row:
            prompts.append(format_prompt(str(row["question"]), template))
        else:
            raise ValueError(f"{path}: row without 'prompt' or 'question': {row}")
    return prompts[:limit] if limit is not None else prompts


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_stages.tiny.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", type=Path, required=True)
    parser.add_argument("--reward-model", type=Path, default=None)
    parser.add_argument("--prompts", type=Path, required=True, help="jsonl with 'prompt' or 'question'")
    parser.add_argument("--tokenizer", type=Path, default=None, help="default: the policy directory")
    parser.add_argument("--template", default=DEFAULT_PROMPT_TEMPLATE, help="used for 'question' rows")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--samples-per-prompt", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args(argv)

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer or args.policy))
    policy = load_policy(args.policy, args.device)
    reward_model = reward_tokenizer = None
    if args.reward_model is not None:
        reward_model = AutoModelForSequenceClassification.from_pretrained(str(args.reward_model), num_labels=1)
        reward_model.to(args.device)
        if _has_tokenizer(args.reward_model):
            reward_tokenizer = AutoTokenizer.from_pretrained(str(args.reward_model))
    summary = evaluate_policy(
        policy,
        tokenizer,
        load_prompts(args.prompts, args.template, args.limit),
        reward_model=reward_model,
        reward_tokenizer=reward_tokenizer,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        greedy=args.greedy,
        temperature=args.temperature,
        samples_per_prompt=args.samples_per_prompt,
    )
    text = json.dumps(summary, indent=2)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n", encoding="utf-8")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
