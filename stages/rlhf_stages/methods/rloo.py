"""RLOO stage: REINFORCE leave-one-out (TRL RLOOTrainer) against this run's reward model.

Each step samples ``numGenerations`` completions for each of ``batchSize`` prompts; the baseline of
a completion is the mean reward of the *other* completions of its prompt (Ahmadian et al. 2024),
an unbiased, value-free variance reduction. ``beta`` weighs the KL to the reference (the SFT policy:
the LoRA adapter disabled, or a frozen copy when all weights are trained). Rewards as in GRPO
(``policy_rl``): prompt + completion + EOS scored by the reward model, ``missingEosPenalty`` for
answers cut off at ``responseLength.max``.

Inputs, output, metrics and the watch (``rloo.watch``) as for GRPO (``rloo/adapter`` or ``rloo/model``).
"""

from __future__ import annotations

from rlhf_stages.methods import policy_rl
from rlhf_stages.runtime.context import StageContext, StageOutcome

validate = policy_rl.validate


def run(ctx: StageContext) -> StageOutcome:
    from trl import RLOOConfig, RLOOTrainer

    return policy_rl.run_online(ctx, RLOOTrainer, RLOOConfig, {})
