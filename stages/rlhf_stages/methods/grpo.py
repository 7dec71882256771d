"""GRPO stage: group relative policy optimisation (TRL GRPOTrainer) against this run's reward model.

Each step samples ``numGenerations`` completions for each of ``batchSize`` prompts; a completion's
advantage is its reward minus the mean of its group, divided by the group's standard deviation,
so no value model is needed. ``beta`` weighs the KL to the reference (the SFT policy: the LoRA
adapter disabled, or a frozen copy when all weights are trained). The reward is the reward model's
score of prompt + completion + EOS (see ``policy_rl``), minus ``missingEosPenalty`` for answers cut
off at ``responseLength.max``.

Inputs: ``sft/model`` (else ``baseModel``), ``grpo.rewardModel`` or this run's ``reward/model``,
prompts from ``grpo.dataset`` rendered with ``promptTemplate`` (``evalFraction`` held out).
Output: ``grpo/adapter`` (merged by the merge stage) or ``grpo/model``. Metrics: the last logged
``reward_mean``, ``reward_std``, ``kl``, ``entropy``, ``response_length``, ``truncated_rate`` and, on
the held-out prompts, ``eval_reward_mean``, ``eval_eos_rate``, ``eval_length_tokens``.

Watch (``grpo.watch``, as PPO's; docs/watch.md): held-out evaluations in ``grpo/evaluations.jsonl``,
the reward-hacking detectors, stop on an alarm, and the selected evaluation's weights as the output
(the final ones then in ``grpo/final/``); ``policy_rl.watch_callback`` hooks it into the trainer.
"""

from __future__ import annotations

from rlhf_stages.methods import policy_rl
from rlhf_stages.runtime.context import StageContext, StageOutcome

validate = policy_rl.validate


def run(ctx: StageContext) -> StageOutcome:
    from trl import GRPOConfig, GRPOTrainer

    # loss_type "dapo" (TRL's default) normalises by the active tokens of the whole batch, which has
    # no length bias; group-scaled rewards are GRPO's advantage.
    return policy_rl.run_online(ctx, GRPOTrainer, GRPOConfig, {"loss_type": "dapo", "scale_rewards": "group"})
