"""The clipped PPO objectives (Schulman et al. 2017) over masked response tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_stages.methods.ppo.advantages import masked_mean, masked_var


@dataclass(frozen=True)
class PolicyLoss:
    loss: torch.Tensor
    clip_frac: torch.Tensor  # share of tokens where the clipped term was the active one
    approx_kl: torch.Tensor  # 0.5 * E[(log ratio)^2]: how far this update moved from the rollout policy


@dataclass(frozen=True)
class ValueLoss:
    loss: torch.Tensor
    clip_frac: torch.Tensor


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> PolicyLoss:
    """Pessimistic (max of the two losses) clipped surrogate, averaged over response tokens."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_frac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = 0.5 * masked_mean(log_ratio**2, mask)
    return PolicyLoss(loss, clip_frac, approx_kl)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
) -> ValueLoss:
    """0.5 * max(unclipped, clipped) squared error; the clip keeps the value near its rollout estimate."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_frac = masked_mean((clipped > unclipped).float(), mask)
    return ValueLoss(loss, clip_frac)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[returns - values] / Var[returns]: 1 is a perfect critic, <= 0 no better than a constant."""
    var_returns = masked_var(returns, mask, across_ranks=True)
    return 1.0 - masked_var(returns - values, mask, across_ranks=True) / var_returns.clamp(min=1e-8)
