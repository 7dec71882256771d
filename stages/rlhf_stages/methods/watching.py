"""The stage side of the reward-hacking watch (docs/watch.md), shared by PPO, GRPO, RLOO and ReST.

``sampling.watch`` owns the numbers, the detectors, the selection and the evaluation log; this module
owns what every watched stage does around them, so the stages differ only in how their policy
answers: where the reward model's own score range comes from (:func:`reward_score_max`), which
prompts are evaluated (:func:`watch_prompts`), the log line of an evaluation (:func:`log_record`),
the end of training (:func:`conclude`: the output becomes the selected checkpoint) and, for the
Trainer-based stages, the hook into the HF Trainer (:class:`WatchCallback`). Imports transformers:
stages import it inside ``run``, so ``validate`` stays light.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from transformers import TrainerCallback

from rlhf_api.watch import EvaluationRow
from rlhf_stages.methods import common, watch_judge
from rlhf_stages.runtime import data
from rlhf_stages.runtime.checkpoints import rank_max, ranks_agree
from rlhf_stages.runtime.context import StageContext, StageError
from rlhf_stages.runtime.outputs import completed_manifest
from rlhf_stages.sampling.watch import MAX_FINDINGS, Answers, Watcher, preference_accuracy, status_rows

log = logging.getLogger(__name__)
T = TypeVar("T")


def reward_score_max(ctx: StageContext) -> float | None:
    """The highest score this run's reward stage gave an answer of its own data (None: unknown, e.g.
    with an external ``rewardModel``: ``scoreOutOfRange`` is then off)."""
    if ctx.config.reward_model is not None:
        return None
    manifest = completed_manifest(ctx.stage_output_of("reward")) or {}
    value = (manifest.get("details", {}).get("scoreRange") or {}).get("max")
    return float(value) if value is not None else None


def make_watcher(ctx: StageContext, kl_target: float | None, total_steps: int | None = None) -> Watcher:
    """The stage's watcher over ``spec.<stage>.watch``; its files live in the stage's checkpoint directory.
    ``total_steps``: the stage's budget in its own steps (default ``totalSteps``; ReST: Improve steps)."""
    cfg = ctx.config
    return Watcher(
        cfg.watch,
        ctx.checkpoints_dir,
        kl_target=kl_target,
        score_max=reward_score_max(ctx),
        total_steps=cfg.total_steps if total_steps is None else total_steps,
        judge=watch_judge.make(ctx),
    )


def watch_prompts(held_out: Sequence[T], train: Sequence[T], count: int) -> list[T]:
    """The held-out prompts when the dataset holds some out, else the first training prompts."""
    return list(held_out or train)[:count]


def preference_pairs(ctx: StageContext, seed: int | None = None) -> list[tuple[str, str, str]]:
    """(prompt rendered with promptTemplate, chosen, rejected) of ``watch.preferenceSet``; none when unset.
    ``seed``: the stage's data seed (default ``seed``; ReST keeps it in ``training.seed``)."""
    cfg = ctx.config
    source = cfg.watch.preference_set
    if source is None or cfg.watch.eval_every == 0:
        return []
    rows = data.load_rows(ctx, source, cfg.seed if seed is None else seed)
    what = f"{ctx.stage}.watch.preferenceSet"
    data.check_columns(rows, ["chosen", "rejected", *data.template_fields(cfg.prompt_template)], what)
    picked = rows.select(range(min(len(rows), common.EVAL_PROMPTS_MAX)))
    return [(data.render(cfg.prompt_template, row), row["chosen"], row["rejected"]) for row in picked]


def with_preferences(answers: Answers, policy: Any, tokenizer: Any, pairs: Sequence[tuple[str, str, str]]) -> Answers:
    """``answers`` plus the policy's preference accuracy on ``pairs`` (unchanged when there are none)."""
    if not pairs:
        return answers
    return replace(answers, preference_accuracy=preference_accuracy(policy, tokenizer, pairs))


def log_record(ctx: StageContext, record: dict[str, Any]) -> None:
    """One evaluation in the stage's log; its findings also in the progress the operator reads."""
    log.info(
        "%s evaluation at step %d: score %.3f (sd %.3f) kl %.3f length %.1f eos %.2f distinct-2 %.3f%s",
        ctx.stage,
        record["step"],
        record["score_mean"],
        record["score_std"],
        record["kl_mean"],
        record["length_mean"],
        record["eos_rate"],
        record["distinct_2"],
        "".join(f"; ALARM {f}" for f in record["findings"]),
    )
    ctx.report_alarms(list(record["findings"]))


@dataclass
class Concluded:
    """What the watch adds to a stage's outcome."""

    selected_step: int | None = None
    selection: str | None = None
    summary: dict[str, Any] | None = None
    """details.watch of the manifest (None: the watch was off)."""
    findings: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    evaluations: list[EvaluationRow] = field(default_factory=list)
    """The evaluations status shows (``sampling.watch.status_rows``)."""


def conclude(
    ctx: StageContext,
    watcher: Watcher,
    final_step: int,
    *,
    save_final: Callable[[], object],
    load_weights: Callable[[dict[str, Any]], None],
) -> Concluded:
    """At the end of training (rank 0, before the output is saved): choose the output among the
    evaluated checkpoints; when it is not the final policy, ``save_final`` keeps the final weights
    (under ``<stage>/final/``) and ``load_weights`` puts the chosen ones into the policy, which the
    stage then saves as its output. The evaluation log is copied into the output."""
    if not watcher.enabled:
        return Concluded()
    selected, selection = watcher.selection(final_step)
    summary = watcher.summary(final_step)
    if selected != final_step:
        save_final()
        load_weights(watcher.candidate_weights(selected))
    watcher.publish(ctx.staging_dir)
    return Concluded(
        selected_step=selected,
        selection=selection,
        summary=summary,
        findings=watcher.findings()[:MAX_FINDINGS],
        evaluations=status_rows(summary["evaluations"], selected),
        metrics={"watch_alarms": float(len(watcher.findings())), "selected_step": float(selected)},
    )


@dataclass
class Rollback:
    """How a Trainer-based stage answers ``watch.action: rollback`` (called on every rank)."""

    restore: Callable[[dict[str, Any]], None]
    """Put the kept candidate's trainable weights into the policy and forget the optimizer's moments."""
    strengthen: Callable[[int], dict[str, Any]]
    """Set the KL penalty for after ``n`` rollbacks (the spec's times ``rollbackKlFactor`` ** n);
    returns what the evaluation log records of it."""


def check_ranks_restored(module: Any) -> None:
    """After a rollback every rank must train from the same weights (collective). Each rank reads
    the kept candidate from the shared volume itself, and DDP averages gradients, not weights: a
    rank that put back other weights (or none) would go on training another policy, unseen, and
    the output, rank 0's, would not be what the others trained. Compared by a fingerprint (the sum
    of the trainable weights), once per rollback."""
    fingerprint = sum(float(p.detach().double().sum()) for p in module.parameters() if p.requires_grad)
    if not ranks_agree(fingerprint):
        raise StageError(
            "watch rollback: the ranks hold different policies after putting back the kept candidate "
            "(a rank read another file from the shared volume?); restart the stage to resume from its checkpoint"
        )


_CONTINUE, _ROLLBACK, _STOP = 0.0, 1.0, 2.0  # the verdict every rank agrees on (the largest wins)


class WatchCallback(TrainerCallback):
    """Evaluates a Trainer-based stage's policy (GRPO, RLOO) before the first step, every
    ``evalEvery`` steps and after the last; on an alarm ends training (``action: stop``) or, given
    ``rollback``, puts back the kept candidate and strengthens the KL penalty (``action: rollback``).

    Rank 0 evaluates (``evaluate`` and ``weights`` are called there only: nothing in them may
    communicate); every rank then agrees on the verdict, so all stop or roll back at the same step.
    On a resumed run the watcher first keeps the records up to the resumed step, and the KL penalty
    is set for the rollbacks those records hold (the Trainer's checkpoint does not keep it).
    """

    def __init__(
        self,
        ctx: StageContext,
        watcher: Watcher,
        evaluate: Callable[[], Answers],
        weights: Callable[[], dict[str, Any]],
        rollback: Rollback | None = None,
    ) -> None:
        self.ctx = ctx
        self.watcher = watcher
        self.evaluate = evaluate
        self.weights = weights
        self.rollback = rollback
        self.stopped_by_alarm = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
        if self.ctx.is_main and self.watcher.enabled:
            self.watcher.resume(state.global_step)
        if self.rollback is not None:
            done = int(rank_max(len(self.watcher.rollbacks()) if self.ctx.is_main else 0))
            if done:
                self.rollback.strengthen(done)
        return self._evaluate(state.global_step, control)  # the baseline or, resumed, nothing new

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
        return self._evaluate(state.global_step, control)

    def _evaluate(self, step: int, control: Any) -> Any:
        verdict = _CONTINUE
        if self.ctx.is_main:
            if self.watcher.due(step):
                log_record(self.ctx, self.watcher.record(step, self.evaluate(), self.weights))
            # Also when resumed past an alarm that a SIGTERM interrupted before the stop took effect.
            # At the last step there is nothing left to train: the selection alone decides the output.
            decision = self.watcher.decision() if step < self.watcher.total_steps else "continue"
            if decision == "rollback" and self.rollback is None:
                decision = "stop"
            verdict = {"continue": _CONTINUE, "rollback": _ROLLBACK, "stop": _STOP}[decision]
        verdict = rank_max(verdict)
        if verdict == _STOP:
            self.stopped_by_alarm = True
            control.should_training_stop = True
        elif verdict == _ROLLBACK and self.rollback is not None:
            self._roll_back(step)
        return control

    def _roll_back(self, step: int) -> None:
        """Every rank: the kept candidate's weights (read from the shared volume), fresh optimizer
        moments, the stronger KL; rank 0 records it on the alarm's evaluation."""
        assert self.rollback is not None
        done = int(rank_max(len(self.watcher.rollbacks()) if self.ctx.is_main else 0))
        restored, state = self.watcher.load_candidate()
        self.rollback.restore(state)
        kl = self.rollback.strengthen(done + 1)
        if self.ctx.is_main:
            note = self.watcher.note_rollback(restored, kl)
            log.warning(
                "%s watch: rollback %d at step %d to step %d's policy, %s",
                self.ctx.stage,
                note["number"],
                step,
                restored,
                ", ".join(f"{k} {v:g}" for k, v in kl.items()),
            )
