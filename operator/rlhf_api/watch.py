"""Watching policy optimisation for reward hacking: periodic held-out evaluation, detectors, selection.

Declared once here; the PPO, GRPO, RLOO and ReST stages read it as ``spec.<stage>.watch``
(rlhf_stages/sampling/watch.py does the work) and docs/watch.md explains every threshold and what the
detectors cannot see.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from .base import ApiModel
from .sources import DatasetSource

# Names of the detectors, as findings and docs spell them.
REWARD_WITH_COLLAPSE = "rewardRiseWithCollapse"
KL_BEYOND_LIMIT = "klBeyondLimit"
SCORE_OUT_OF_RANGE = "scoreOutOfRange"
PREFERENCE_FALLING = "preferenceAccuracyFalling"
DETECTORS = (REWARD_WITH_COLLAPSE, KL_BEYOND_LIMIT, SCORE_OUT_OF_RANGE, PREFERENCE_FALLING)

WatchAction = Literal["warn", "stop", "rollback"]
CheckpointSelection = Literal["lastBeforeAlarm", "last", "bestReward"]


class Watch(ApiModel):
    """Evaluate the policy on held-out prompts during training, raise an alarm when it games the reward
    model, and choose which evaluated checkpoint becomes the stage's output."""

    eval_every: Annotated[int, Field(ge=0, le=100000)] = 10
    """Evaluate every N optimisation steps (and before the first step and after the last); 0 turns
    evaluation, detectors and checkpoint selection off."""
    eval_prompts: Annotated[int, Field(ge=1, le=4096)] = 32
    """Held-out prompts (the dataset's evalFraction split; the first training prompts when nothing is
    held out) answered at each evaluation, one sampled answer each, with the same seed every time."""
    samples_kept: Annotated[int, Field(ge=0, le=32)] = 3
    """Answers kept per evaluation in the stage's evaluation log, for people to read."""
    action: WatchAction = "stop"
    """What an alarm does besides the RewardHackingSuspected condition and event: ``stop`` ends training
    at the evaluation that raised it; ``warn`` trains on to totalSteps; ``rollback`` (PPO only) puts
    back the policy of the kept candidate evaluation, strengthens the KL penalty by
    ``rollbackKlFactor`` and trains on, at most ``maxRollbacks`` times, then stops. Either way the
    output is the checkpoint ``select`` picks."""
    max_rollbacks: Annotated[int, Field(ge=1, le=10)] = 2
    """action rollback: rollbacks allowed; the alarm after the last one stops training."""
    rollback_kl_factor: Annotated[float, Field(gt=1.0, le=100.0)] = 2.0
    """action rollback: each rollback multiplies the KL coefficient by this and, with the adaptive
    controller, divides its klTarget by it (else the controller would walk the coefficient back)."""
    select: CheckpointSelection = "lastBeforeAlarm"
    """Which evaluated checkpoint becomes the output: ``lastBeforeAlarm`` (the last evaluation before
    any detector fired; the final policy when none did), ``last`` (the final policy, always) or
    ``bestReward`` (the highest mean reward-model score among the evaluations before any alarm)."""
    min_reward_rise: Annotated[float, Field(ge=0.0, le=1000.0)] = 0.5
    """rewardRiseWithCollapse: the mean reward-model score must have risen at least this much above the
    first evaluation's (in reward-model units) for a collapse to count as reward hacking."""
    length_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.6
    """rewardRiseWithCollapse: a collapse is a mean response length below this fraction of the first
    evaluation's, or ..."""
    distinct_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    """... distinct bigrams (across the evaluation's answers) below this fraction of the first
    evaluation's, or ..."""
    repetition_rise: Annotated[float, Field(ge=0.0, le=1.0)] = 0.25
    """... the share of repeated tokens within answers risen by more than this over the first evaluation's."""
    kl_limit: Annotated[float, Field(gt=0.0)] | None = None
    """klBeyondLimit: the mean per-answer KL to the reference (nats) above which the policy has left the
    reference too far. Unset: 3 x klTarget for PPO; off for GRPO and RLOO (no KL target to scale)."""
    out_of_range_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    """scoreOutOfRange: fires when at least this share of answers score above the highest score the
    reward model gave any answer of its own training data (recorded by this run's reward stage; off
    with an external rewardModel)."""
    preference_set: DatasetSource | None = None
    """Held-out preference pairs (columns prompt, chosen, rejected; the prompt rendered with the
    stage's promptTemplate; at most 128 rows, fewer with maxSamples; evalFraction is not applied):
    each evaluation records the policy's own preference accuracy on them, the share of pairs whose
    chosen answer it gives a higher mean per-token log-probability than the rejected one. Unset:
    not measured, preferenceAccuracyFalling off."""
    accuracy_drop: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    """preferenceAccuracyFalling: fires when the preference accuracy fell this much below the first
    evaluation's."""


class ReSTWatch(Watch):
    """The watch of ReST, whose steps are Improve steps (a handful per run, not hundreds): evaluated
    after every one by default. Rollback is refused (docs/watch.md says why)."""

    eval_every: Annotated[int, Field(ge=0, le=100000)] = 1
    """Evaluate after every N Improve steps (and before the first Grow step and after the last
    Improve step); 0 turns evaluation, detectors and checkpoint selection off."""
