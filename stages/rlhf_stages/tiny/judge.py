"""A tiny AI judge for RLAIF on the tiny assets, built offline (no hub, no network).

A randomly initialised model knows nothing, so the judge is taught the judging format itself:
a small Llama (the tiny assets' tokenizer) is trained to answer `` A`` or `` B`` after
``judge.render_judge_prompt`` on the tiny preference pairs, each shown in both orders, under
:data:`TINY_CONSTITUTION`, which states the tiny task's target behaviour in words. Only the verdict
token is trained (the rest of the prompt is context). The judge never sees the held-out topics;
its pair accuracy on them (both orders) is measured on ``preferences_eval.jsonl`` and written to
``judge.json`` next to the weights.

Usage::

    python -m rlhf_stages.tiny.judge --assets DIR [--out DIR/judge] [--steps N] [--seed S]

This is test and quickstart scaffolding: a real run names a capable judge (a hub id or a model
directory on the volume) in ``rlaif.judge``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhf_api.judging import DEFAULT_JUDGE_TEMPLATE
from rlhf_stages.methods.judge import CHOICES, Verdict, choice_log_probs, probability_first, render_judge_prompt
from rlhf_stages.methods.judge import summarise as summarise_verdicts
from rlhf_stages.tiny.assets import TinyAssets, read_jsonl, tiny_llama

# Short on purpose: every judge prompt carries it, and the tiny tokenizer spells unseen words byte by byte.
TINY_CONSTITUTION = (
    "Be positive about the asked topic.",
    "End the sentence; never repeat.",
)
JUDGE_DIR = "judge"
DEFAULT_STEPS = 500
BATCH_SIZE = 32
LM_WEIGHT = 0.3


def judge_examples(
    rows: Sequence[dict[str, Any]], principles: Sequence[str], template: str = DEFAULT_JUDGE_TEMPLATE
) -> list[tuple[str, str]]:
    """(judge prompt, correct choice) for each pair in both orders."""
    out = []
    for r in rows:
        out.append((render_judge_prompt(template, principles, r["prompt"], r["chosen"], r["rejected"]), CHOICES[0]))
        out.append((render_judge_prompt(template, principles, r["prompt"], r["rejected"], r["chosen"]), CHOICES[1]))
    return out


def _batch(tokenizer: Any, examples: Sequence[tuple[str, str]]) -> tuple[Any, Any, Any]:
    """Right-padded ids, attention mask and labels of the choice tokens only (-100 elsewhere)."""
    import torch

    seqs, labels = [], []
    for prompt, choice in examples:
        p = tokenizer(prompt)["input_ids"]
        c = tokenizer(choice, add_special_tokens=False)["input_ids"]
        seqs.append(p + c)
        labels.append([-100] * len(p) + c)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    target = torch.full_like(ids, -100)
    for i, (s, lab) in enumerate(zip(seqs, labels, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        target[i, : len(lab)] = torch.tensor(lab)
    return ids, mask, target


def _loss(logits: Any, ids: Any, mask: Any, labels: Any) -> Any:
    """The verdict's cross-entropy, plus a smaller language-modelling term over the whole prompt.

    The verdict alone is one token per example: learning it from scratch stalled on some seeds
    (pair accuracy 0.67 after 600 steps where another seed reached 0.91). Predicting the prompt's
    own tokens too teaches the words (which are positive, which name the topic) the verdict needs.
    """
    from torch.nn.functional import cross_entropy

    shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
    verdict = cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=-100)
    text_targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100).reshape(-1)
    return verdict + LM_WEIGHT * cross_entropy(shifted, text_targets, ignore_index=-100)


def pair_accuracy(
    model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], principles: Sequence[str]
) -> dict[str, float]:
    """How often the judge prefers ``chosen`` (both orders averaged), plus its agreement and position bias."""
    prompts = [p for p, _ in judge_examples(rows, principles)]
    scores = choice_log_probs(model, tokenizer, prompts)
    verdicts = [
        Verdict(probability_first(*scores[2 * i]), 1.0 - probability_first(*scores[2 * i + 1]))
        for i in range(len(rows))
    ]
    return {"pair_accuracy": sum(v.x_wins for v in verdicts) / len(verdicts)} | summarise_verdicts(verdicts)


def build_tiny_judge(
    assets_dir: Path, out_dir: Path | None = None, *, steps: int = DEFAULT_STEPS, seed: int = 0, lr: float = 3e-3
) -> dict[str, Any]:
    """Train the judge on the tiny preference pairs; save it (with the tokenizer) and its report."""
    import torch
    from transformers import AutoTokenizer

    assets = TinyAssets.at(assets_dir)
    out = out_dir or assets.root / JUDGE_DIR
    tokenizer = AutoTokenizer.from_pretrained(str(assets.tokenizer))
    examples = judge_examples(read_jsonl(assets.preferences), TINY_CONSTITUTION)
    # Larger than the base model: it must compare two answers across a longer prompt.
    model = tiny_llama(tokenizer, seed, hidden=128, layers=3, max_positions=512)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50) * (1 - s / steps))
    rng = random.Random(seed)
    started = time.monotonic()
    model.train()
    losses: list[float] = []
    order: list[int] = []
    for _ in range(steps):
        if len(order) < BATCH_SIZE:
            order = list(range(len(examples)))
            rng.shuffle(order)
        batch = [examples[order.pop()] for _ in range(BATCH_SIZE)]
        ids, mask, labels = _batch(tokenizer, batch)
        loss = _loss(model(input_ids=ids, attention_mask=mask).logits, ids, mask, labels)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    seconds = time.monotonic() - started
    report = {
        "constitution": list(TINY_CONSTITUTION),
        "steps": steps,
        "train_seconds": round(seconds, 1),
        "final_loss": sum(losses[-20:]) / min(20, len(losses)),
        "held_out": pair_accuracy(model, tokenizer, read_jsonl(assets.preferences_eval), TINY_CONSTITUTION),
    }
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / "judge.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_stages.tiny.judge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=Path, required=True, help="a tiny assets directory (rlhf_stages.tiny)")
    parser.add_argument("--out", type=Path, default=None, help="where to save the judge (default: ASSETS/judge)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(build_tiny_judge(args.assets, args.out, steps=args.steps, seed=args.seed), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
