"""The AI judge of RLAIF: how it is asked, how its answer is read, how both orders are combined.

The judge is a causal LM shown the constitution, the question and two answers labelled A and B,
ending with ``judgeTemplate``'s cue (by default ``Better answer:``). Its verdict is read from its
next-token distribution, not from free text (Lee et al. 2023): the log-probabilities of the two
choice strings (`` A`` and `` B``) are compared, and ``P(A) = softmax(log p(A), log p(B))[0]``.

Position bias: a judge may prefer whatever comes first. With ``bothOrders`` every pair is asked
twice, (x, y) and (y, x); the pair's preference is the mean of ``P(x first)`` and ``P(x second)``,
and the pair is kept only when the two verdicts agree. The agreement rate and the share of "A"
verdicts (0.5 for an unbiased judge on balanced pairs) are reported.

The pure parts (rendering, combining verdicts) import nothing heavy, so ``rlaif.validate`` and the
unit tests use them without torch; ``choice_log_probs`` needs torch and a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rlhf_api.judging import JUDGE_TEMPLATE_FIELDS

CHOICES = (" A", " B")


def render_constitution(principles: Sequence[str]) -> str:
    """One principle per line, as a list: ``- principle``."""
    return "\n".join(f"- {p.strip()}" for p in principles if p.strip())


def parse_constitution(text: str) -> list[str]:
    """A ConfigMap's ``constitution`` value: one principle per line; blank lines and ``#`` comments ignored;
    a leading ``- `` is dropped (so a rendered constitution reads back as the same list)."""
    principles = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        principles.append(line[2:].strip() if line.startswith("- ") else line)
    return principles


def render_judge_prompt(template: str, principles: Sequence[str], prompt: str, a: str, b: str) -> str:
    """The judge's input for answers ``a`` (shown as A) and ``b`` (shown as B).

    ``str.replace`` rather than ``str.format``: answers and prompts may contain braces.
    """
    out = template
    for name, value in (("constitution", render_constitution(principles)), ("prompt", prompt)):
        out = out.replace("{" + name + "}", value)
    # a and b last, so text inside an answer is never substituted again.
    head, _, rest = out.partition("{a}")
    middle, _, tail = rest.partition("{b}")
    return head + a + middle + b + tail


def missing_template_fields(template: str) -> list[str]:
    return [f for f in JUDGE_TEMPLATE_FIELDS if "{" + f + "}" not in template]


def probability_first(log_p_a: float, log_p_b: float) -> float:
    """P(A) from the two choices' log-probabilities (a two-way softmax, numerically stable)."""
    d = log_p_a - log_p_b
    if d >= 0:
        return 1.0 / (1.0 + math.exp(-d))
    e = math.exp(d)  # d < 0: exp(-d) could overflow, exp(d) cannot
    return e / (1.0 + e)


@dataclass(frozen=True)
class Verdict:
    """The judge on one pair (x, y) of answers to the same prompt."""

    p_x_shown_first: float
    """P(A) when x was shown as A."""
    p_x_shown_second: float | None
    """P(B) when x was shown as B (None: asked in one order only)."""

    @property
    def preference_x(self) -> float:
        """P(x better than y), averaged over the orders asked."""
        if self.p_x_shown_second is None:
            return self.p_x_shown_first
        return (self.p_x_shown_first + self.p_x_shown_second) / 2

    @property
    def agreed(self) -> bool:
        """Both orders name the same winner (always true when asked once)."""
        if self.p_x_shown_second is None:
            return True
        return (self.p_x_shown_first > 0.5) == (self.p_x_shown_second > 0.5)

    @property
    def x_wins(self) -> bool:
        return self.preference_x > 0.5

    def first_position_votes(self) -> list[bool]:
        """For each order asked: did the judge pick the answer shown first (A)?"""
        votes = [self.p_x_shown_first > 0.5]
        if self.p_x_shown_second is not None:
            votes.append(self.p_x_shown_second <= 0.5)
        return votes


def summarise(verdicts: Sequence[Verdict]) -> dict[str, float]:
    """Agreement rate, the judge's preference for position A, and its mean confidence."""
    if not verdicts:
        return {}
    votes = [v for verdict in verdicts for v in verdict.first_position_votes()]
    return {
        "agreement_rate": sum(v.agreed for v in verdicts) / len(verdicts),
        "first_position_rate": sum(votes) / len(votes),
        "judge_confidence": sum(abs(v.preference_x - 0.5) * 2 for v in verdicts) / len(verdicts),
    }


def choice_log_probs(
    model: Any, tokenizer: Any, prompts: Sequence[str], choices: Sequence[str] = CHOICES, batch_size: int = 16
) -> list[list[float]]:
    """For each prompt, the judge's log-probability of each choice string as its continuation.

    A choice may span several tokens (small vocabularies); its log-probability is the sum over its
    tokens given the prompt. Prompts are left-truncated to the model's context, keeping the cue.
    """
    import torch

    device = next(model.parameters()).device
    choice_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
    limit = getattr(model.config, "max_position_embeddings", None) or 4096
    room = limit - max(len(c) for c in choice_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[list[float]] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            encoded = [tokenizer(p)["input_ids"][-room:] for p in prompts[start : start + batch_size]]
            rows = [(i, ids + c) for i, ids in enumerate(encoded) for c in choice_ids]
            width = max(len(r) for _, r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for row, (_, seq) in enumerate(rows):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            log_probs = torch.log_softmax(logits, dim=-1).cpu()
            scores: list[float] = []
            for row, (i, _) in enumerate(rows):
                c = choice_ids[row % len(choice_ids)]
                at = len(encoded[i])  # first choice token position
                scores.append(sum(float(log_probs[row, at - 1 + k, tok]) for k, tok in enumerate(c)))
            n = len(choice_ids)
            out.extend(scores[j : j + n] for j in range(0, len(scores), n))
    return out
