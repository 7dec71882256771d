"""PPO's per-token rewards, the KL controllers, GAE and (distributed) whitening.

Conventions shared by the PPO modules: a rollout's response is a right-padded ``[B, T]`` tensor
with a ``mask`` that is 1 on generated tokens (the EOS included) and 0 after them. ``logprobs``,
``values`` and ``rewards`` are aligned with the response tokens: position ``t`` belongs to the
decision that produced response token ``t`` (``values[t]`` is V of the state before it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _common_device(values: tuple[torch.Tensor, ...]) -> torch.device:
    """Where the stacked scalars go: the accelerator any of them lives on (callers mix GPU statistics with
    CPU counters; stacking those fails, seen on the first GPU run), and NCCL reduces accelerator tensors only."""
    for v in values:
        if v.device.type != "cpu":
            return v.device
    if _distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_sum(*values: torch.Tensor) -> list[torch.Tensor]:
    """Sum scalars over all ranks (one all-reduce); identity in a single process."""
    device = _common_device(values)
    stacked = torch.stack([v.detach().float().reshape(()).to(device) for v in values])
    if _distributed():
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    return list(stacked.unbind())


def masked_mean(x: torch.Tensor, mask: torch.Tensor, *, across_ranks: bool = False) -> torch.Tensor:
    """Mean of ``x`` where ``mask`` is 1; over every rank's tokens when ``across_ranks``."""
    total, count = (x * mask).sum(), mask.sum()
    if across_ranks:
        total, count = global_sum(total, count)
    return total / count.clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, *, across_ranks: bool = False) -> torch.Tensor:
    """Unbiased variance of the masked entries of ``x``."""
    mean = masked_mean(x, mask, across_ranks=across_ranks)
    sq, count = ((x - mean) ** 2 * mask).sum(), mask.sum()
    if across_ranks:
        sq, count = global_sum(sq, count)
    return sq / (count - 1).clamp(min=1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, across_ranks: bool = True) -> torch.Tensor:
    """Zero mean, unit variance over the masked entries (of the whole global batch by default).

    Whitening per rank would give each rank a different advantage scale; the all-reduce keeps
    data-parallel training equivalent to one process holding the whole batch.
    """
    mean = masked_mean(x, mask, across_ranks=across_ranks)
    var = masked_var(x, mask, across_ranks=across_ranks)
    return ((x - mean) * torch.rsqrt(var + 1e-8)) * mask


@dataclass
class KLController:
    """The coefficient of the per-token KL penalty; adaptive per Ziegler et al. (2019) or fixed.

    The adaptive rule moves the coefficient proportionally to how far the observed KL (summed over
    a response, averaged over responses) is from ``target``, with the error clipped to +-20% and
    the step scaled by the rollouts seen over ``horizon`` rollouts.
    """

    value: float
    adaptive: bool
    target: float
    horizon: int
    target_scale: float = 1.0
    """What the watch's rollbacks made of ``target`` (each divides it by its factor)."""

    @property
    def effective_target(self) -> float:
        return self.target * self.target_scale

    def update(self, observed_kl: float, num_rollouts: int) -> None:
        if not self.adaptive:
            return
        error = min(max(observed_kl / self.effective_target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * num_rollouts / self.horizon

    def strengthen(self, factor: float) -> None:
        """A rollback's stronger KL penalty: the coefficient times ``factor`` and, adaptive, the
        target divided by it (else the controller would walk the coefficient back to the old KL)."""
        self.value *= factor
        if self.adaptive:
            self.target_scale /= factor

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The coefficient and the rollbacks' scale are state: target and horizon come from the spec.
        self.value = float(state["value"])
        self.target_scale = float(state.get("target_scale", 1.0))  # absent: written before rollbacks existed


def shaped_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    scores: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: ``-kl_coef * KL_t`` everywhere, plus the sequence score on the last token.

    KL_t is the sampled estimate ``log pi(a_t) - log ref(a_t)``; its sum over a response is an
    unbiased estimate of KL(pi || ref) for that prompt. Returns (rewards, kl per token).
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = mask.sum(dim=1).long().clamp(min=1) - 1
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores
    return rewards * mask, kl


def generalized_advantages(
    values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (Schulman et al. 2016) per response; the value after the last token is 0 (episode end).

    Returns (advantages, returns) with ``returns = advantages + values`` as the value target.
    Padding positions have mask 0, so their value is ignored and nothing leaks across the end.
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], device=rewards.device, dtype=rewards.dtype)
    next_value = torch.zeros_like(running)
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m
        advantages[:, t] = running
        # A padded position passes on nothing: the next real position sees V=0 and A=0 after it.
        next_value = values[:, t] * m
    return advantages, (advantages + values) * mask
