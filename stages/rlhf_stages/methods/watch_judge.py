"""The watch's judge (``<stage>.watch.judge``, docs/watch.md): a judge model compares every held-out
answer with the starting policy's answer to the same prompt.

Asked as the RLAIF stage asks its judge (``methods.judge``: the template, the constitution, the
next-token probabilities of `` A`` and `` B``), always in both orders because a judge may prefer
whatever comes first: the current answer shown as A, then as B. Per prompt, P(current better) is the
mean of the two (``judge.Verdict.preference_x``); the evaluation's win rate is the mean over the
prompts. So the win rate is 0.5 for answers the judge finds as good as the starting policy's, and
0.5 at the first evaluation by construction: those answers *are* the baseline, and an answer
compared with itself in both orders gets P(A) and 1 - P(A), whose mean is 0.5 exactly; it is
recorded, not computed. For the same reason a later answer identical to its baseline counts 0.5
without asking the judge (the same sampling seed makes that common early on).

The baseline answers live in the checkpoint directory (``BASELINE_FILE``), so a restarted stage
compares with the same answers. The judge is loaded at the first evaluation that needs it (not at
the baseline), once, on the evaluating process only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhf_api.watch import WatchJudge
from rlhf_stages.methods import judge
from rlhf_stages.runtime import models
from rlhf_stages.runtime.atomic import write_json_atomic
from rlhf_stages.runtime.context import StageContext
from rlhf_stages.sampling.watch import JUDGE_EVEN, Answers

log = logging.getLogger(__name__)

BASELINE_FILE = "watch-judge-baseline.json"
JUDGE_BATCH = 16


def win_rate(
    shown_first: Sequence[Sequence[float]], shown_second: Sequence[Sequence[float]], settled: Sequence[float | None]
) -> float:
    """Mean P(current answer better) over the prompts.

    ``shown_first[i]`` / ``shown_second[i]``: the judge's log-probabilities of (`` A``, `` B``) for the
    i-th judged prompt with the current answer shown as A / as B; ``settled[j]``: the preference of
    prompt j when it needs no judge (identical answers: 0.5), None for the judged ones, in order."""
    judged = iter(
        judge.Verdict(judge.probability_first(*a), 1.0 - judge.probability_first(*b)).preference_x
        for a, b in zip(shown_first, shown_second, strict=True)
    )
    prefs = [next(judged) if s is None else s for s in settled]
    if next(judged, None) is not None:
        raise ValueError("more verdicts than prompts to judge")
    return sum(prefs) / len(prefs) if prefs else JUDGE_EVEN


def check(ctx: StageContext) -> None:
    """The judge's model must be there before training starts (exit 3, naming the field)."""
    spec: WatchJudge | None = ctx.config.watch.judge
    if spec is not None and ctx.config.watch.eval_every > 0:
        models.check_model_dir(models.locate(ctx, spec.model), f"{ctx.stage}.watch.judge.model")


class AnswerJudge:
    """``Watcher``'s ``judge``: called with each evaluation's step and answers, returns the win rate."""

    def __init__(self, ctx: StageContext, spec: WatchJudge, directory: Path) -> None:
        self.ctx = ctx
        self.spec = spec
        self.path = directory / BASELINE_FILE
        self.model: Any = None
        self.tokenizer: Any = None

    def __call__(self, step: int, answers: Answers) -> float:
        baseline = self._baseline()
        if step == 0 or baseline is None:  # the first evaluation: these answers are the baseline
            if step != 0:  # e.g. watch.judge added to the spec of a run resumed past step 0
                log.warning("%s.watch.judge: no baseline answers; step %d's become it", self.ctx.stage, step)
            write_json_atomic(self.path, {"step": step, "prompts": list(answers.prompts), "texts": list(answers.texts)})
            return JUDGE_EVEN
        if list(baseline["prompts"]) != list(answers.prompts):
            raise RuntimeError(f"{self.path}: the baseline answered other prompts than this evaluation's")
        pairs = list(zip(answers.prompts, answers.texts, baseline["texts"], strict=True))
        settled: list[float | None] = [JUDGE_EVEN if now == then else None for _, now, then in pairs]
        asked = [p for p, s in zip(pairs, settled, strict=True) if s is None]
        rules = self.spec.constitution
        first = [judge.render_judge_prompt(self.spec.template, rules, q, now, then) for q, now, then in asked]
        second = [judge.render_judge_prompt(self.spec.template, rules, q, then, now) for q, now, then in asked]
        scores = self._log_probs(first + second) if asked else []
        return win_rate(scores[: len(asked)], scores[len(asked) :], settled)

    def _baseline(self) -> dict[str, Any] | None:
        return json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else None

    def _log_probs(self, prompts: list[str]) -> list[list[float]]:
        if self.model is None:
            self._load()
        return judge.choice_log_probs(self.model, self.tokenizer, prompts, batch_size=JUDGE_BATCH)

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        where = models.locate(self.ctx, self.spec.model)
        what = f"{self.ctx.stage}.watch.judge"
        self.tokenizer = models.load_tokenizer(where)
        model = models.load_model(where, AutoModelForCausalLM, models.Quantization(), what, self.spec.dtype)
        if torch.cuda.is_available():  # the evaluating process's device (accelerate set it)
            model = model.to(torch.device("cuda", torch.cuda.current_device()))
        self.model = model.eval().requires_grad_(False)
        log.info("%s: judge %s loaded", what, where.label)


def make(ctx: StageContext) -> AnswerJudge | None:
    """The stage's judge, or None when ``watch.judge`` is unset."""
    spec = ctx.config.watch.judge
    return None if spec is None else AnswerJudge(ctx, spec, ctx.checkpoints_dir)
