"""Watching policy optimisation for reward hacking: periodic held-out evaluation, detectors, selection.

Declared once here; the PPO, GRPO, RLOO and ReST stages read it as ``spec.<stage>.watch``
(rlhf_stages/sampling/watch.py does the work) and docs/watch.md explains every threshold and what the
detectors cannot see.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from .base import ApiModel, Rule
from .judging import (
    DEFAULT_JUDGE_TEMPLATE,
    MAX_PRINCIPLES,
    JudgeDtype,
    JudgeTemplate,
    Principle,
    judge_template_rule,
)
from .sources import DatasetSource, ModelSource

# Names of the detectors, as findings and docs spell them.
REWARD_WITH_COLLAPSE = "rewardRiseWithCollapse"
KL_BEYOND_LIMIT = "klBeyondLimit"
SCORE_OUT_OF_RANGE = "scoreOutOfRange"
PREFERENCE_FALLING = "preferenceAccuracyFalling"
CHECKS_FAILING = "checkPassRateFalling"
JUDGE_FALLING = "judgeWinRateFalling"
DETECTORS = (
    REWARD_WITH_COLLAPSE,
    KL_BEYOND_LIMIT,
    SCORE_OUT_OF_RANGE,
    PREFERENCE_FALLING,
    CHECKS_FAILING,
    JUDGE_FALLING,
)

# The signals that know what a good answer is, each an evaluation record's key -> the watch field that
# turns it on. Without any of them the watch sees only the answers' shape (score, length, diversity,
# KL), and a hack that keeps length and vocabulary passes silently (docs/watch.md, "Other holes"):
# the report and rlhfctl say so when such a run raised no alarm.
ANSWER_SIGNALS = {"preference_accuracy": "preferenceSet", "check_pass_rate": "checks", "judge_win_rate": "judge"}


def shape_only_note(measured: set[str]) -> str | None:
    """For a run without an alarm whose evaluations measured the keys ``measured``: the note that says
    which answer signals were off, or None when at least one was on."""
    if measured & set(ANSWER_SIGNALS):
        return None
    return (
        f"no alarm, but this watch had no {', no '.join(ANSWER_SIGNALS.values())}: it saw only the answers' shape "
        "(score, length, diversity, KL), so a hack that keeps their length and vocabulary (a flipped sentiment, "
        'a wrong topic) would not show (docs/watch.md, "What they cannot see")'
    )


WatchAction = Literal["warn", "stop", "rollback"]
CheckpointSelection = Literal["lastBeforeAlarm", "last", "bestReward"]


def _compiles(pattern: str) -> str:
    # Python's re, as the stage applies it. The API server cannot check this: CEL has no test for
    # whether a string compiles, and its RE2 dialect differs from Python's (lookarounds,
    # backreferences), so a refusal there would refuse patterns the stage accepts. The operator,
    # `rlhfctl validate` and every stage refuse a pattern that does not compile, naming the field.
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"not a Python regular expression ({exc}); e.g. (?i)https?:// or \\.$") from exc
    return pattern


AnswerPattern = Annotated[str, Field(min_length=1, max_length=512), AfterValidator(_compiles)]
"""A Python regular expression, searched anywhere in the answer (``re.search``; anchor it with ^ or $)."""

_CHECK_KINDS = ("must_match", "must_not_match", "min_chars", "max_chars", "max_tokens")


class AnswerCheck(ApiModel):
    """A named check every answer should pass, applied to the decoded answer (without EOS) of each
    held-out prompt at every evaluation. An answer passes the check when it passes every condition set in it."""

    rules = (
        Rule(
            cel="has(self.mustMatch) || has(self.mustNotMatch) || has(self.minChars) || has(self.maxChars)"
            " || has(self.maxTokens)",
            message="a check needs at least one condition: mustMatch, mustNotMatch, minChars, maxChars or maxTokens",
            check=lambda r: any(getattr(r, name) is not None for name in _CHECK_KINDS),
        ),
        Rule(
            cel="!has(self.minChars) || !has(self.maxChars) || self.minChars <= self.maxChars",
            message="minChars must not exceed maxChars: no answer could pass",
            field_path=".minChars",
            check=lambda r: r.min_chars is None or r.max_chars is None or r.min_chars <= r.max_chars,
        ),
    )

    name: Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]
    """Lowercase letters, digits and '-'; names the check in the evaluation log, the findings and status."""
    must_match: AnswerPattern | None = None
    """A Python regular expression the answer must contain (``re.search``), e.g. ``\\.$`` (ends with a
    period); ``(?i)`` makes it case-insensitive."""
    must_not_match: AnswerPattern | None = None
    """A Python regular expression the answer must not contain, e.g. ``https?://`` (no links)."""
    min_chars: Annotated[int, Field(ge=0, le=1000000)] | None = None
    """The answer must have at least this many characters (after stripping surrounding whitespace)."""
    max_chars: Annotated[int, Field(ge=0, le=1000000)] | None = None
    """The answer must have at most this many characters (after stripping surrounding whitespace)."""
    max_tokens: Annotated[int, Field(ge=0, le=1000000)] | None = None
    """The answer must have at most this many tokens (the policy's tokenizer, EOS excluded). An answer
    cut off at ``responseLength.max`` without EOS fails it too when the limit is below that budget."""


class WatchJudge(ApiModel):
    """A judge model that compares each held-out answer with the starting policy's answer to the same
    prompt, under a written constitution, at every evaluation (docs/watch.md: its cost and what it
    cannot see). Asked the way the RLAIF stage asks its judge: both orders, the next-token
    probabilities of `` A`` and `` B``."""

    rules = (judge_template_rule("template", "template"),)

    model: ModelSource
    """The judge: a causal LM (hub id or a directory on the volume), e.g. the one rlaif.judge names."""
    dtype: JudgeDtype = "bfloat16"
    """Dtype the judge is loaded in (it is only run forward)."""
    constitution: list[Principle] = Field(min_length=1, max_length=MAX_PRINCIPLES)
    """Principles the judge applies, e.g. ``Prefer the answer that is kind and on topic.``"""
    template: JudgeTemplate = DEFAULT_JUDGE_TEMPLATE
    """The judge's prompt, as rlaif.judgeTemplate: ``{constitution}``, ``{prompt}``, ``{a}`` and ``{b}``;
    it must end where the judge's next words are `` A`` or `` B``."""


class Watch(ApiModel):
    """Evaluate the policy on held-out prompts during training, raise an alarm when it games the reward
    model, and choose which evaluated checkpoint becomes the stage's output."""

    rules = (
        Rule(
            cel="!has(self.checks) || self.checks.all(c, self.checks.exists_one(o, o.name == c.name))",
            message="every check needs its own name: the evaluation log and findings name the check that fails",
            field_path=".checks",
            check=lambda w: len({c.name for c in w.checks}) == len(w.checks),
        ),
    )

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
    at the evaluation that raised it; ``warn`` trains on to totalSteps; ``rollback`` (PPO, GRPO and
    RLOO with beta > 0; not ReST) puts back the policy of the kept candidate evaluation, strengthens
    the KL penalty by ``rollbackKlFactor`` and trains on, at most ``maxRollbacks`` times, then stops. Either way the
    output is the checkpoint ``select`` picks."""
    max_rollbacks: Annotated[int, Field(ge=1, le=10)] = 2
    """action rollback: rollbacks allowed; the alarm after the last one stops training."""
    rollback_kl_factor: Annotated[float, Field(gt=1.0, le=100.0)] = 2.0
    """action rollback: each rollback multiplies the KL coefficient (PPO; GRPO and RLOO: beta) by this
    and, with PPO's adaptive controller, divides its klTarget by it (else the controller would walk the
    coefficient back)."""
    select: CheckpointSelection = "lastBeforeAlarm"
    """Which evaluated checkpoint becomes the output: ``lastBeforeAlarm`` (the last evaluation before
    any detector fired; the final policy when none did), ``last`` (the final policy, always) or
    ``bestReward`` (the highest mean reward-model score among the evaluations before any alarm).
    Either way only an evaluation that had not begun to drift counts (``candidateLengthRatio``)."""
    candidate_length_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.9
    """Which evaluations before an alarm can become the output (``select``) or be rolled back to: not
    one whose mean length had already fallen below this fraction of the first evaluation's while its
    reward-model score had risen by ``minRewardRise``, a policy on its way to the collapse the alarm
    names (on the tiny task's hole the last evaluation above ``lengthRatio``, at 0.74-0.83 x, had often
    lost ground truth already; sound runs stayed at 0.91 x or more; docs/watch.md). 0 (or at most
    ``lengthRatio``) keeps every evaluation before the alarm eligible. Only matters once an alarm
    fires: with none, the output is the final policy."""
    min_reward_rise: Annotated[float, Field(ge=0.0, le=1000.0)] = 0.5
    """rewardRiseWithCollapse: the mean reward-model score must have risen at least this much above the
    first evaluation's (in reward-model units) for a collapse to count as reward hacking."""
    length_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.7
    """rewardRiseWithCollapse: a collapse is a mean response length below this fraction of the first
    evaluation's, or ..."""
    distinct_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.35
    """... distinct bigrams (across the evaluation's answers) below this fraction of the first
    evaluation's (sound RL sharpens the policy: 0.50-0.92 seen on the tiny task's sound runs), or ..."""
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
    checks: list[AnswerCheck] = Field(default_factory=list, max_length=16)
    """Rule-based checks every answer should pass (a pattern it must or must not contain, a length
    limit): each evaluation records the share of held-out answers passing all of them and each one's
    pass rate. Empty: not measured, checkPassRateFalling off."""
    check_drop: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    """checkPassRateFalling: fires when the share of answers passing every check fell this much below
    the first evaluation's."""
    judge: WatchJudge | None = None
    """A judge model comparing every held-out answer with the first evaluation's answer to the same
    prompt (the starting policy's): each evaluation records its win rate, the mean probability that
    the current answer is the better one (0.5 at the first evaluation). Unset: not measured,
    judgeWinRateFalling off. A second model in memory on the evaluating process."""
    judge_drop: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.15
    """judgeWinRateFalling: fires when the judge's win rate is below 0.5 minus this."""


class ReSTWatch(Watch):
    """The watch of ReST, whose steps are Improve steps (a handful per run, not hundreds): evaluated
    after every one by default. Rollback is refused (docs/watch.md says why)."""

    eval_every: Annotated[int, Field(ge=0, le=100000)] = 1
    """Evaluate after every N Improve steps (and before the first Grow step and after the last
    Improve step); 0 turns evaluation, detectors and checkpoint selection off."""


EVALUATION_ROWS: int = 8
"""Evaluations a stage's result and its status carry (the evaluation log keeps every one)."""


class EvaluationRow(ApiModel):
    """One held-out evaluation as status shows it (numbers rounded; the stage's evaluation log and the
    run report keep every number and the sample answers)."""

    step: Annotated[int, Field(ge=0)]
    """The training step evaluated (0: before training; ReST: the Improve step)."""
    score: float | None = None
    """Mean raw reward-model score of the answers."""
    kl: float | None = None
    """Mean per-answer KL to the reference (nats); unset where there is no reference."""
    length: float | None = None
    """Mean answer length in tokens (EOS excluded)."""
    distinct2: float | None = None
    """Distinct bigrams over all bigrams of the answers."""
    preference_accuracy: float | None = None
    """The policy's preference accuracy on watch.preferenceSet, when set."""
    check_pass_rate: float | None = None
    """Share of answers passing every watch.checks check, when checks are set."""
    judge_win_rate: float | None = None
    """The watch.judge's win rate of the answers over the first evaluation's, when a judge is set."""
    alarm: bool = False
    """A detector fired at this evaluation."""
    selected: bool = False
    """This evaluation's weights are the stage's output."""
