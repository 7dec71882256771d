"""Evaluation of a policy on the tiny synthetic task (see ``tiny_assets``).

Two independent signals:

* the **ground truth**: a program that knows the target behaviour
  (:func:`meets_target`, :func:`ground_truth_score`), which cannot be gamed
  the way a learned reward model can;
* the **reward model** score (:func:`score_with_reward_model`), i.e. what RL
  optimised.

A policy that raises the reward but not the ground-truth target rate has
found a hole in the reward model; tests should look at both.

CLI::

    python -m rlhf_stages.sampling.evaluation --policy PATH [--reward-model PATH] \\
        --prompts FILE [--tokenizer PATH] [--max-new-tokens N] [--seed S] \\
        [--greedy] [--json OUT]

``FILE`` is jsonl with a ``prompt`` column (already formatted with the prompt
template) or a ``question`` column (formatted here with ``--template``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_stages.tiny.assets import (
    ALL_TOPICS,
    DEFAULT_PROMPT_TEMPLATE,
    NEGATIVE_WORDS,
    POSITIVE_WORDS,
    format_prompt,
    read_jsonl,
)

if TYPE_CHECKING:  # heavy imports only for type checkers
    import torch

_WORD_RE = re.compile(r"[a-z]+(?:'[a-z]+)?")
_POSITIVE = frozenset(POSITIVE_WORDS)
_NEGATIVE = frozenset(NEGATIVE_WORDS)
_TOPIC_PAIRS = frozenset((t.split()[0], t.split()[1]) for t in ALL_TOPICS)

MIN_WORDS = 3
MAX_WORDS = 24
# A word used this often in one short answer means a loop ("good good good",
# "the lake is nice. the lake is nice. the lake is nice.").  No well-formed
# answer of the grammar repeats a word more than twice.
MAX_WORD_REPEATS = 2


# --------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------


def words(text: str) -> list[str]:
    """Lower-cased word tokens (punctuation dropped)."""
    return _WORD_RE.findall(text.lower())


def topics_in(text: str) -> list[str]:
    """Known topics ("old lake") mentioned in ``text``, in order."""
    ws = words(text)
    return [f"{a} {b}" for a, b in itertools.pairwise(ws) if (a, b) in _TOPIC_PAIRS]


def prompt_topic(prompt: str) -> str | None:
    """The topic a prompt asks about: the last known topic in it."""
    found = topics_in(prompt)
    return found[-1] if found else None


@dataclass(frozen=True)
class TargetCheck:
    """Why a completion does or does not meet the target."""

    num_words: int
    positive: int
    negative: int
    non_empty: bool
    complete: bool  # ends like a sentence, i.e. was not cut off
    on_topic: bool
    not_repetitive: bool
    length_ok: bool

    @property
    def well_formed(self) -> bool:
        return self.non_empty and self.complete and self.on_topic and self.not_repetitive and self.length_ok

    @property
    def meets_target(self) -> bool:
        return self.well_formed and self.positive > self.negative

    def failures(self) -> list[str]:
        """Names of the failed criteria (empty list when the target is met)."""
        criteria = {
            "empty": self.non_empty,
            "incomplete": self.complete,
            "off_topic": self.on_topic,
            "repetitive": self.not_repetitive,
            "bad_length": self.length_ok,
            "not_positive": self.positive > self.negative,
        }
        return [name for name, ok in criteria.items() if not ok]


def check_target(text: str, prompt: str | None = None) -> TargetCheck:
    """Check a completion against the target behaviour.

    ``text`` is the completion (the answer only; a leading copy of ``prompt``
    is stripped).  With a ``prompt`` naming a known topic the answer must
    mention that exact topic (both words, adjacent); without one any known
    topic counts.
    """
    if prompt is not None and text.startswith(prompt):
        text = text[len(prompt) :]
    stripped = text.strip()
    ws = words(stripped)
    counts = Counter(ws)
    topic = prompt_topic(prompt) if prompt is not None else None
    mentioned = topics_in(stripped)
    on_topic = (topic in mentioned) if topic is not None else bool(mentioned)
    immediate_repeat = any(a == b for a, b in itertools.pairwise(ws))
    return TargetCheck(
        num_words=len(ws),
        positive=sum(1 for w in ws if w in _POSITIVE),
        negative=sum(1 for w in ws if w in _NEGATIVE),
        non_empty=bool(ws),
        complete=stripped.endswith((".", "!", "?")),
        on_topic=on_topic,
        not_repetitive=bool(ws) and max(counts.values()) <= MAX_WORD_REPEATS and not immediate_repeat,
        length_ok=MIN_WORDS <= len(ws) <= MAX_WORDS,
    )


def meets_target(text: str, prompt: str | None = None) -> bool:
    """True when ``text`` shows the target behaviour (see :func:`check_target`)."""
    return check_target(text, prompt).meets_target


def ground_truth_score(text: str, prompt: str | None = None) -> float:
    """Graded ground truth in [-1, 1], positive exactly when :func:`meets_target`.

    With ``s = (pos - neg) / (pos + neg)`` over sentiment words (0 without
    any): a malformed answer (empty, cut off, off-topic, repetitive, bad
    length) scores -1, a well-formed one ``s`` when ``s > 0`` and ``s / 2``
    otherwise, so a fluent negative answer (-0.5) still ranks above garbage.
    """
    check = check_target(text, prompt)
    if not check.well_formed:
        return -1.0
    s = (check.positive - check.negative) / max(1, check.positive + check.negative)
    return s if s > 0 else s / 2


# --------------------------------------------------------------------------
# Generation and reward-model scoring
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Completion:
    prompt: str
    text: str  # decoded answer, EOS excluded (starts with the separator space)
    ended_with_eos: bool
    num_tokens: int  # generated tokens, EOS included


def _device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        ids.update(int(i) for i in gen_eos)
    return ids


def generate_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    seed: int = 0,
    *,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int = 32,
) -> list[Completion]:
    """Sample one completion per prompt, deterministically for ``seed``.

    Defaults sample from the unmodified distribution (temperature 1, no top-k
    or top-p), which is what RL trains; ``greedy=True`` decodes greedily.  The
    global torch RNG is left untouched.
    """
    import torch
    from transformers import GenerationConfig

    if not prompts:
        return []
    device = _device_of(model)
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    gen_kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": not greedy,
        "eos_token_id": sorted(eos_ids),
        "pad_token_id": pad_id,
    }
    if not greedy:
        gen_kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
    gen_config = GenerationConfig(**gen_kwargs)

    results: list[Completion] = []
    was_training = model.training
    old_side = tokenizer.padding_side
    # Left padding: generation continues from the true end of each prompt.
    tokenizer.padding_side = "left"
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        model.eval()
        with torch.random.fork_rng(devices=cuda_devices), torch.no_grad():
            torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                batch = list(prompts[start : start + batch_size])
                enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                out = model.generate(**enc, generation_config=gen_config)
                new_tokens = out[:, enc["input_ids"].shape[1] :].tolist()
                for prompt, ids in zip(batch, new_tokens, strict=True):
                    cut = next((i for i, t in enumerate(ids) if t in eos_ids), None)
                    answer = ids if cut is None else ids[:cut]
                    results.append(
                        Completion(
                            prompt=prompt,
                            text=tokenizer.decode(answer, skip_special_tokens=True),
                            ended_with_eos=cut is not None,
                            num_tokens=len(answer) + (cut is not None),
                        )
                    )
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return results


def score_with_reward_model(
    reward_model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    completions: Sequence[str | Completion],
    *,
    ended_with_eos: Sequence[bool] | None = None,
    batch_size: int = 32,
) -> list[float]:
    """Reward-model score of each ``prompt + completion``.

    The EOS token is appended when the completion ended with EOS (as in
    reward-model training data, where every answer is complete).  A
    completion cut off by ``max_new_tokens`` is scored without it, so the
    reward model can tell it is unfinished.  For plain strings the flags come
    from ``ended_with_eos`` and default to True.

    ``reward_model`` is a sequence-classification model with one label.
    Sequences are batched only with others of the same length, so no padding
    is involved and the score is always read at the true last token (even
    when the model's pad id equals its EOS id).
    """
    import torch

    if len(prompts) != len(completions):
        raise ValueError("prompts and completions differ in length")
    if ended_with_eos is not None and len(ended_with_eos) != len(completions):
        raise ValueError("ended_with_eos and completions differ in length")
    eos_id = tokenizer.eos_token_id
    max_len = getattr(reward_model.config, "max_position_embeddings", None)

    sequences: list[list[int]] = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        if isinstance(completion, Completion):
            text, ended = completion.text, completion.ended_with_eos
        else:
            text, ended = completion, True if ended_with_eos is None else ended_with_eos[i]
        ids = list(tokenizer(prompt + text)["input_ids"])
        if ended and eos_id is not None and (not ids or ids[-1] != eos_id):
            ids.append(eos_id)
        if max_len and len(ids) > max_len:
            ids = ids[-max_len:]  # keep the end: that is where the score is read
        sequences.append(ids)

    config = reward_model.config
    pad_id = getattr(config, "pad_token_id", None)
    # If the pad id occurs inside a sequence (pad == eos), HF pooling would
    # skip it; hide the pad id and score one sequence at a time instead.
    pad_collides = pad_id is not None and any(pad_id in s for s in sequences)
    if pad_collides:
        batch_size = 1
    device = _device_of(reward_model)
    scores = [0.0] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    groups: list[list[int]] = []
    for i in order:
        if groups and len(sequences[groups[-1][0]]) == len(sequences[i]) and len(groups[-1]) < batch_size:
            groups[-1].append(i)
        else:
            groups.append([i])

    was_training = reward_model.training
    try:
        reward_model.eval()
        if pad_collides:
            config.pad_token_id = None
        with torch.no_grad():
            for group in groups:
                input_ids = torch.tensor([sequences[i] for i in group], device=device)
                logits = reward_model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
                for i, value in zip(group, logits[:, 0].float().tolist(), strict=True):
                    scores[i] = float(value)
    finally:
        if pad_collides:
            config.pad_token_id = pad_id
        reward_model.train(was_training)
    return scores


# --------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


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


def load_policy(path: Path, device: str = "cpu") -> Any:
    """A causal LM from a full checkpoint or a PEFT adapter directory."""
    model: Any
    if (path / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(str(path))
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path))
    return model.to(device)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rlhf_stages.sampling.evaluation", description=__doc__.split("\n\n")[0]
    )
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
