"""Rollouts: sampling responses from the policy and reading log-probabilities and values for them.

A batch is kept as a left-padded query (so generation continues from every prompt's true end) and
a right-padded response. Positions are recomputed from the attention mask, so a left-padded prompt
sees the same positions as it would unpadded (the reward and value models were trained that way).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional


@dataclass(frozen=True)
class Rollout:
    """One batch of prompts and the responses sampled for them (tensors on the model's device)."""

    query: torch.Tensor  # [B, P] prompt ids, left-padded
    query_mask: torch.Tensor  # [B, P] 1 on prompt tokens
    response: torch.Tensor  # [B, T] sampled ids, right-padded (EOS kept as the last real token)
    response_mask: torch.Tensor  # [B, T] float, 1 on generated tokens (EOS included)
    ended_with_eos: torch.Tensor  # [B] bool

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(dim=1)

    def sequence(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, position_ids) of prompt + response."""
        input_ids = torch.cat([self.query, self.response], dim=1)
        attention_mask = torch.cat([self.query_mask, self.response_mask.long()], dim=1)
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        return input_ids, attention_mask, position_ids

    def select(self, index: torch.Tensor) -> Rollout:
        return Rollout(
            *(t[index] for t in (self.query, self.query_mask, self.response, self.response_mask, self.ended_with_eos))
        )


def sample_budgets(generator: torch.Generator, n: int, low: int, high: int) -> list[int]:
    """One response-length budget per sample, uniform in [low, high] (inclusive).

    Sampling per sample (rather than one budget per batch) mixes short and long budgets in every
    batch, so no single step is dominated by truncated responses.
    """
    return torch.randint(low, high + 1, (n,), generator=generator).tolist()


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate(
    policy: Any,
    prompts: Sequence[Sequence[int]],
    budgets: Sequence[int],
    *,
    eos_ids: Sequence[int],
    pad_id: int,
    temperature: float,
    top_k: int,
    top_p: float,
    extra: dict[str, Any],
) -> Rollout:
    """Sample one response per prompt; response ``i`` stops at EOS or after ``budgets[i]`` tokens.

    One generate() call runs to the largest budget; cutting a sample at its own budget afterwards
    gives exactly the distribution of generating it with that max_new_tokens, because sampling is
    autoregressive.
    """
    from transformers import GenerationConfig

    device = next(policy.parameters()).device
    query, query_mask = left_pad(prompts, pad_id, device)
    config = GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        max_new_tokens=max(budgets),
        eos_token_id=list(eos_ids),
        pad_token_id=pad_id,
        **extra,
    )
    was_training = policy.training
    policy.eval()
    try:
        out = policy.generate(input_ids=query, attention_mask=query_mask, generation_config=config)
    finally:
        policy.train(was_training)
    generated = out[:, query.shape[1] :]

    is_eos = torch.zeros_like(generated, dtype=torch.bool)
    for eos in eos_ids:
        is_eos |= generated == eos
    budget = torch.tensor(list(budgets), device=device).clamp(max=generated.shape[1])
    positions = torch.arange(generated.shape[1], device=device).expand_as(generated)
    in_budget = positions < budget[:, None]
    first_eos = torch.where(is_eos & in_budget, positions, generated.shape[1]).min(dim=1).values
    ended = first_eos < budget
    lengths = torch.where(ended, first_eos + 1, budget)
    width = int(lengths.max())
    mask = (positions < lengths[:, None])[:, :width]
    response = torch.where(mask, generated[:, :width], torch.full_like(generated[:, :width], pad_id))
    return Rollout(query, query_mask, response, mask.float(), ended)


def token_logprobs(
    model: Any, rollout: Rollout, temperature: float, *, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of every response token under ``model`` at the sampling temperature.

    Logits are divided by the rollout temperature so that the ratio in the PPO loss compares the
    distributions the samples were drawn from (top-k/top-p truncation is not modelled, as usual).
    """
    input_ids, attention_mask, position_ids = rollout.sequence()
    width = rollout.response.shape[1]
    # Only the logits that predict response tokens: the prompt's would cost [B, P, vocab] memory.
    logits = (
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=width + 1)
        .logits[:, :-1]
        .float()
        / temperature
    )
    logp_all = functional.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, rollout.response.unsqueeze(-1)).squeeze(-1) * rollout.response_mask
    entropy = None
    if with_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1) * rollout.response_mask
    return logprobs, entropy


def token_values(scorer: Callable[..., torch.Tensor], rollout: Rollout) -> torch.Tensor:
    """Per-token values: the scorer's output at the position before each response token."""
    input_ids, attention_mask, position_ids = rollout.sequence()
    width = rollout.response.shape[1]
    scores = scorer(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    return scores[:, -width - 1 : -1].float() * rollout.response_mask


def last_token_scores(scorer: Callable[..., torch.Tensor], rollout: Rollout) -> torch.Tensor:
    """Sequence scores read at the last generated token (the EOS when there is one)."""
    input_ids, attention_mask, position_ids = rollout.sequence()
    scores = scorer(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    last = rollout.query.shape[1] + rollout.lengths.long() - 1
    return scores[torch.arange(scores.shape[0], device=scores.device), last].float()
