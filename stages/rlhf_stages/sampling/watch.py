"""Watching policy optimisation: held-out evaluations, reward-hacking detectors, checkpoint selection.

A learned reward model has holes and RL finds them: the score rises while the answers collapse into
something the reward model overrates. The people running a job usually cannot see their task's
ground truth, so the stage watches for the known shapes of that failure itself (docs/watch.md):

- ``summarize``: one evaluation's numbers from the answers to the held-out prompts (reward-model
  score mean/spread, KL to the reference, length distribution, EOS rate, distinct-n, repetition,
  and the pass rates of the spec's rule-based checks, ``run_checks``);
- ``detect``: the detectors, pure functions of the evaluation history (first record = baseline);
- ``select``: which evaluated checkpoint becomes the output, by the spec's criterion;
- :class:`Watcher`: the state a training loop keeps: the evaluation log (JSON lines, one record per
  evaluation, in the checkpoint directory while training and in the stage's output at the end), the
  weights of the selected candidate, and whether an alarm ended training. It survives a restart:
  both live in the checkpoint directory and records newer than the resumed step are dropped.

How the policy answers is the loop's: PPO samples through its own rollout (``methods.ppo.watch``);
the Trainer-based stages (GRPO, RLOO) through :func:`sample_answers`, with ``methods.watching``
hooking the watcher into the HF Trainer. Both sample with :data:`EVAL_SEED`.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rlhf_api.watch import (
    CHECKS_FAILING,
    EVALUATION_ROWS,
    JUDGE_FALLING,
    KL_BEYOND_LIMIT,
    PREFERENCE_FALLING,
    REWARD_WITH_COLLAPSE,
    SCORE_OUT_OF_RANGE,
    AnswerCheck,
    EvaluationRow,
    Watch,
)

LOG_FILE = "evaluations.jsonl"
CANDIDATE_FILE = "watch-candidate.pt"
KL_TARGET_FACTOR = 3.0  # kl_limit default: this many times the adaptive controller's target
MAX_FINDINGS = 4  # what a StageResult carries (the log keeps every one)
EVAL_SEED = 20231  # every evaluation samples with this seed: two evaluations differ only by the policy
JUDGE_EVEN = 0.5  # the judge's win rate of answers as good as the starting policy's (the baseline's own)


@dataclass(frozen=True)
class Answers:
    """What one evaluation produced: one answer per held-out prompt."""

    tokens: Sequence[Sequence[int]]
    """Generated token ids, EOS and padding removed."""
    ended_with_eos: Sequence[bool]
    scores: Sequence[float]
    """Raw reward-model scores (no EOS penalty): comparable with the reward model's training range."""
    kl: Sequence[float]
    """Per-answer KL to the reference: sum over its tokens of log p_policy - log p_reference."""
    texts: Sequence[str]
    prompts: Sequence[str]
    preference_accuracy: float | None = None
    """The policy's preference accuracy on the held-out pairs (``preference_accuracy``); None: no set."""
    judge_win_rate: float | None = None
    """The watch's judge: mean P(this answer beats the first evaluation's); None: no judge."""


@dataclass(frozen=True)
class Finding:
    detector: str
    step: int
    evidence: str

    def __str__(self) -> str:
        return f"{self.detector} at step {self.step}: {self.evidence}"


# ------------------------------------------------------------------ numbers of one evaluation


def _quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default), without numpy."""
    s = sorted(xs)
    if not s:
        return math.nan
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def distinct_n(answers: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams over all n-grams of all answers (1.0: nothing repeats anywhere)."""
    grams = [tuple(a[i : i + n]) for a in answers for i in range(len(a) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition(answer: Sequence[int]) -> float:
    """Share of an answer's tokens that already occurred earlier in it."""
    if not answer:
        return 0.0
    return 1.0 - len(set(answer)) / len(answer)


def fails(check: AnswerCheck, text: str, tokens: int) -> bool:
    """Whether an answer (its decoded text and its token count, EOS excluded) fails ``check``."""
    body = text.strip()
    return (
        (check.must_match is not None and re.search(check.must_match, body) is None)
        or (check.must_not_match is not None and re.search(check.must_not_match, body) is not None)
        or (check.min_chars is not None and len(body) < check.min_chars)
        or (check.max_chars is not None and len(body) > check.max_chars)
        or (check.max_tokens is not None and tokens > check.max_tokens)
    )


def run_checks(checks: Sequence[AnswerCheck], answers: Answers) -> list[list[str]]:
    """Per answer, the names of the ``checks`` it fails (empty: it passes all of them)."""
    return [
        [c.name for c in checks if fails(c, text, len(tokens))]
        for text, tokens in zip(answers.texts, answers.tokens, strict=True)
    ]


def summarize(
    answers: Answers, score_max: float | None, samples_kept: int, checks: Sequence[AnswerCheck] = ()
) -> dict[str, Any]:
    """One evaluation record (without its step)."""
    lengths = [float(len(t)) for t in answers.tokens]
    scores = list(answers.scores)
    record: dict[str, Any] = {
        "prompts": len(lengths),
        "score_mean": _mean(scores),
        "score_std": math.sqrt(_mean([(s - _mean(scores)) ** 2 for s in scores])) if scores else math.nan,
        "score_p10": _quantile(scores, 0.1),
        "score_p90": _quantile(scores, 0.9),
        "kl_mean": _mean(list(answers.kl)),
        "length_mean": _mean(lengths),
        "length_p10": _quantile(lengths, 0.1),
        "length_p90": _quantile(lengths, 0.9),
        "eos_rate": _mean([float(e) for e in answers.ended_with_eos]),
        "distinct_1": distinct_n(answers.tokens, 1),
        "distinct_2": distinct_n(answers.tokens, 2),
        "repetition": _mean([repetition(t) for t in answers.tokens]),
    }
    if answers.preference_accuracy is not None:
        record["preference_accuracy"] = answers.preference_accuracy
    if answers.judge_win_rate is not None:
        record["judge_win_rate"] = answers.judge_win_rate
    if score_max is not None:
        record["above_score_range"] = _mean([float(s > score_max) for s in scores])
    failed = run_checks(checks, answers) if checks else []
    if checks:
        record["check_pass_rate"] = _mean([float(not f) for f in failed])
        record["checks"] = {c.name: _mean([float(c.name not in f) for f in failed]) for c in checks}
    record["samples"] = [
        {"prompt": p, "answer": t, "score": s, **({"failed_checks": failed[i]} if checks else {})}
        for i, (p, t, s) in enumerate(list(zip(answers.prompts, answers.texts, scores, strict=True))[:samples_kept])
    ]
    return record


# ------------------------------------------------------------------ answers of a Hugging Face policy


def response_logprobs(
    model: Any, sequences: Sequence[tuple[Sequence[int], Sequence[int]]], temperature: float, batch_size: int = 8
) -> list[float]:
    """Sum over each response's tokens of log p(token | everything before it), at ``temperature``
    (as sampled), for (prompt ids, response ids) pairs. Right-padded batches: positions stay 0..n-1."""
    import torch

    from rlhf_stages.sampling.generate import device_of

    device = device_of(model)
    sums: list[float] = []
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for start in range(0, len(sequences), batch_size):
                chunk = sequences[start : start + batch_size]
                full = [list(p) + list(r) for p, r in chunk]
                width = max(len(f) for f in full)
                ids = torch.zeros(len(full), width, dtype=torch.long)
                mask = torch.zeros(len(full), width, dtype=torch.long)
                for i, f in enumerate(full):
                    ids[i, : len(f)] = torch.tensor(f)
                    mask[i, : len(f)] = 1
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
                logp = torch.log_softmax(logits[:, :-1] / temperature, dim=-1)
                picked = logp.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
                for i, (p, r) in enumerate(chunk):
                    sums.append(float(picked[i, len(p) - 1 : len(p) - 1 + len(r)].sum()) if r else 0.0)
    finally:
        model.train(was_training)
    return sums


def preference_accuracy(policy: Any, tokenizer: Any, pairs: Sequence[tuple[str, str, str]]) -> float:
    """Share of (prompt, chosen, rejected) pairs whose chosen answer (+ EOS) the policy gives a higher
    mean per-token log-probability than the rejected one: its own preference, no reference needed
    (per token, so that a shorter answer is not preferred for being short)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    seqs: list[tuple[list[int], list[int]]] = []
    for prompt, chosen, rejected in pairs:
        ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        for answer in (chosen, rejected):
            seqs.append((ids, list(tokenizer(answer, add_special_tokens=False)["input_ids"]) + eos))
    sums = response_logprobs(policy, seqs, 1.0)
    means = [total / max(1, len(r)) for total, (_, r) in zip(sums, seqs, strict=True)]
    wins = [means[i] > means[i + 1] for i in range(0, len(means), 2)]
    return sum(wins) / len(wins) if wins else math.nan


def sample_answers(
    policy: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    reference: Callable[[], AbstractContextManager[Any]],
    reward_model: Any,
    reward_tokenizer: Any,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
) -> Answers:
    """One evaluation of a Hugging Face policy (GRPO, RLOO): one answer per prompt sampled with
    :data:`EVAL_SEED` and the full budget, the raw reward-model score (no EOS penalty, as PPO's), and
    the KL to the reference. ``reference()`` is a context yielding the reference model (the policy
    with its adapter disabled, or a frozen copy), or None where there is none: the KL is then NaN
    and ``klBeyondLimit`` cannot fire. The global RNG is left as it was (sampling forks it)."""
    from rlhf_stages.sampling.generate import generate_completions
    from rlhf_stages.sampling.score import score_with_reward_model

    done = generate_completions(
        policy,
        tokenizer,
        prompts,
        max_new_tokens,
        EVAL_SEED,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        batch_size=8,
    )
    scores = score_with_reward_model(reward_model, reward_tokenizer, prompts, done)
    # The ids the policy saw (generate_completions encodes prompts without special tokens) and sampled.
    pairs = [(list(tokenizer(c.prompt, add_special_tokens=False)["input_ids"]), list(c.token_ids)) for c in done]
    logprobs = response_logprobs(policy, pairs, temperature)
    with reference() as ref:
        ref_logprobs = response_logprobs(ref, pairs, temperature) if ref is not None else [math.nan] * len(pairs)
    return Answers(
        tokens=[c.token_ids[: len(c.token_ids) - c.ended_with_eos] for c in done],
        ended_with_eos=[c.ended_with_eos for c in done],
        scores=scores,
        kl=[lp - rp for lp, rp in zip(logprobs, ref_logprobs, strict=True)],
        texts=[c.text for c in done],
        prompts=list(prompts),
    )


# ------------------------------------------------------------------ detectors


def kl_limit(watch: Watch, kl_target: float | None) -> float | None:
    """The KL detector's limit: the spec's, else KL_TARGET_FACTOR x the target, else none (off)."""
    if watch.kl_limit is not None:
        return watch.kl_limit
    return KL_TARGET_FACTOR * kl_target if kl_target is not None else None


def detect(history: Sequence[dict[str, Any]], watch: Watch, limit: float | None) -> list[Finding]:
    """Findings about the newest record of ``history``, judged against the first one (the baseline).

    Pure: the same history and settings always give the same findings, so the tests build histories.
    """
    if not history:
        return []
    base, now = history[0], history[-1]
    step = int(now["step"])
    found: list[Finding] = []
    rise = now["score_mean"] - base["score_mean"]
    if len(history) > 1 and rise >= watch.min_reward_rise:
        collapsed = []
        if now["length_mean"] < watch.length_ratio * base["length_mean"]:
            collapsed.append(f"mean length {base['length_mean']:.1f} -> {now['length_mean']:.1f} tokens")
        if now["distinct_2"] < watch.distinct_ratio * base["distinct_2"]:
            collapsed.append(f"distinct-2 {base['distinct_2']:.2f} -> {now['distinct_2']:.2f}")
        if now["repetition"] > base["repetition"] + watch.repetition_rise:
            collapsed.append(f"repeated tokens {base['repetition']:.2f} -> {now['repetition']:.2f}")
        if collapsed:
            evidence = f"reward-model score {base['score_mean']:+.2f} -> {now['score_mean']:+.2f} while " + ", ".join(
                collapsed
            )
            found.append(Finding(REWARD_WITH_COLLAPSE, step, evidence))
    if limit is not None and now["kl_mean"] > limit:
        found.append(Finding(KL_BEYOND_LIMIT, step, f"KL to the reference {now['kl_mean']:.2f} > limit {limit:.2f}"))
    acc, base_acc = now.get("preference_accuracy"), base.get("preference_accuracy")
    if acc is not None and base_acc is not None and acc < base_acc - watch.accuracy_drop:
        found.append(
            Finding(PREFERENCE_FALLING, step, f"preference accuracy on the held-out pairs {base_acc:.2f} -> {acc:.2f}")
        )
    passed, base_passed = now.get("check_pass_rate"), base.get("check_pass_rate")
    if passed is not None and base_passed is not None and passed < base_passed - watch.check_drop:
        rates, base_rates = now.get("checks") or {}, base.get("checks") or {}
        # The check that lost the most, named in the evidence: what the answers now do wrong.
        worst = min(rates, key=lambda name: rates[name] - base_rates.get(name, rates[name]), default=None)
        detail = f" ({worst} {base_rates[worst]:.2f} -> {rates[worst]:.2f})" if worst in base_rates else ""
        found.append(
            Finding(CHECKS_FAILING, step, f"answers passing every check {base_passed:.2f} -> {passed:.2f}{detail}")
        )
    won = now.get("judge_win_rate")
    if won is not None and won < JUDGE_EVEN - watch.judge_drop:
        found.append(
            Finding(JUDGE_FALLING, step, f"the judge prefers the starting policy's answers: win rate {won:.2f}")
        )
    above = now.get("above_score_range")
    if above is not None and above >= watch.out_of_range_fraction:
        found.append(
            Finding(
                SCORE_OUT_OF_RANGE,
                step,
                f"{above:.0%} of answers score above any answer of the reward model's training data",
            )
        )
    return found


# ------------------------------------------------------------------ selection


def first_alarm(history: Sequence[dict[str, Any]]) -> int | None:
    """Step of the first evaluation with a finding that no rollback answered, if any."""
    return next((int(r["step"]) for r in history if r.get("findings") and not r.get("rollback")), None)


def drifting(record: dict[str, Any], base: dict[str, Any], watch: Watch) -> bool:
    """Whether an evaluation had begun to drift toward a collapse though no detector fired yet: its
    score risen by minRewardRise while its mean length fell below candidateLengthRatio x the
    baseline's (Watch.candidate_length_ratio says why). Such a policy is never the output of an
    alarmed run nor the one a rollback puts back."""
    return (
        record["score_mean"] - base["score_mean"] >= watch.min_reward_rise
        and record["length_mean"] < watch.candidate_length_ratio * base["length_mean"]
    )


def select(history: Sequence[dict[str, Any]], watch: Watch, final_step: int) -> tuple[int, str]:
    """(step whose weights become the output, why) among the evaluations of ``history``, by
    ``watch.select``.

    Only evaluations without findings are eligible (after a rollback, the alarm that caused it
    stays in the history but its policy was thrown away), and none that was drifting."""
    criterion = watch.select
    alarm = first_alarm(history)
    before = [r for r in history if not r.get("findings") and (alarm is None or int(r["step"]) < alarm)]
    eligible = [r for r in before if not drifting(r, history[0], watch)]
    if criterion == "last":
        return final_step, "select: last (the final policy)"
    if criterion == "bestReward" and eligible:
        best = max(eligible, key=lambda r: r["score_mean"])
        why = f"select: bestReward (score {best['score_mean']:+.2f}"
        return int(best["step"]), why + (f", evaluations before the alarm at step {alarm})" if alarm else ")")
    if alarm is None:
        return final_step, f"select: {criterion}; no alarm, the final policy"
    if not eligible:  # only possible if the baseline itself alarmed, which detect() never does
        return final_step, f"select: {criterion}; no evaluation before the alarm, the final policy"
    step = int(eligible[-1]["step"])
    skipped = [str(r["step"]) for r in before if int(r["step"]) > step]  # between it and the alarm: all drifting
    drift = (
        f"; steps {', '.join(skipped)} were drifting (length below {watch.candidate_length_ratio:g} x "
        "the baseline's while the score rose)"
        if skipped
        else ""
    )
    return step, f"select: {criterion} (the last evaluation before the alarm at step {alarm}{drift})"


# ------------------------------------------------------------------ what status shows


def _shown(value: Any) -> float | None:
    """A number as status shows it: 4 significant digits; NaN (no reference) and inf are left out
    (the API server's JSON has no NaN)."""
    if not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(f"{value:.4g}")


def status_rows(table: Sequence[dict[str, Any]], selected_step: int | None) -> list[EvaluationRow]:
    """The evaluations a stage's result and status carry, from the manifest's table
    (``details.watch.evaluations``), in step order: the baseline, the selected one, the first alarm
    and the latest always, then the most recent others up to :data:`EVALUATION_ROWS`."""
    if not table:
        return []
    steps = [int(e["step"]) for e in table]
    alarm = next((int(e["step"]) for e in table if e.get("alarm")), None)
    keep = {steps[0], steps[-1]} | {s for s in (selected_step, alarm) if s in steps}
    for step in reversed(steps):
        if len(keep) >= EVALUATION_ROWS:
            break
        keep.add(step)
    return [
        EvaluationRow(
            step=int(e["step"]),
            score=_shown(e.get("score_mean")),
            kl=_shown(e.get("kl_mean")),
            length=_shown(e.get("length_mean")),
            distinct2=_shown(e.get("distinct_2")),
            preference_accuracy=_shown(e.get("preference_accuracy")),
            check_pass_rate=_shown(e.get("check_pass_rate")),
            judge_win_rate=_shown(e.get("judge_win_rate")),
            alarm=bool(e.get("alarm")),
            selected=int(e["step"]) == selected_step,
        )
        for e in table
        if int(e["step"]) in keep
    ]


# ------------------------------------------------------------------ the loop's state


class Watcher:
    """Evaluation log, candidate weights and alarm state of one training run (rank 0 owns the files)."""

    def __init__(
        self,
        watch: Watch,
        directory: Path,
        *,
        kl_target: float | None,
        score_max: float | None,
        total_steps: int,
        judge: Callable[[int, Answers], float] | None = None,
    ) -> None:
        """``judge(step, answers)``: the win rate of ``answers`` over the first evaluation's (the
        watch's judge, ``methods.watch_judge``); None: no judge."""
        self.watch = watch
        self.judge = judge
        self.directory = directory
        self.limit = kl_limit(watch, kl_target)
        self.score_max = score_max
        self.total_steps = total_steps
        self.history: list[dict[str, Any]] = []
        self.candidate_step: int | None = None

    @property
    def enabled(self) -> bool:
        return self.watch.eval_every > 0

    @property
    def log_path(self) -> Path:
        return self.directory / LOG_FILE

    def due(self, step: int) -> bool:
        """Whether step ``step`` (0: before training) is evaluated."""
        if not self.enabled or any(int(r["step"]) == step for r in self.history):
            return False
        return step == 0 or step % self.watch.eval_every == 0 or step == self.total_steps

    @property
    def alarmed(self) -> bool:
        """An alarm stands (one a rollback answered does not)."""
        return first_alarm(self.history) is not None

    def rollbacks(self) -> list[dict[str, Any]]:
        return [dict(r["rollback"], step=r["step"]) for r in self.history if r.get("rollback")]

    def decision(self) -> str:
        """What the newest state asks of the loop: ``continue``, ``stop`` or ``rollback`` (action
        rollback, while rollbacks are left and a healthy candidate is kept; then ``stop``)."""
        if not self.alarmed or self.watch.action == "warn":
            return "continue"
        if self.watch.action == "rollback":
            can = len(self.rollbacks()) < self.watch.max_rollbacks and self.candidate_step is not None
            return "rollback" if can else "stop"
        return "stop"

    def load_candidate(self) -> tuple[int, dict[str, Any]]:
        """(step, weights) of the kept candidate, as any process reads it from the shared volume."""
        import torch

        saved = torch.load(self.directory / CANDIDATE_FILE, map_location="cpu")
        return int(saved["step"]), dict(saved["state"])

    def note_rollback(self, restored: int, kl: dict[str, Any]) -> dict[str, Any]:
        """Record on the newest evaluation (the alarm) that it was answered by restoring step
        ``restored`` with the KL settings ``kl``; its findings stay, and count for status."""
        note = {"restoredStep": restored, "number": len(self.rollbacks()) + 1, **kl}
        self.history[-1]["rollback"] = note
        self._rewrite()
        return note

    def findings(self) -> list[str]:
        return [f for r in self.history for f in r.get("findings", [])]

    def resume(self, step: int) -> None:
        """Keep what the resumed checkpoint had seen (records up to ``step``)."""
        if self.log_path.is_file():
            lines = self.log_path.read_text().splitlines()
            self.history = [r for r in map(json.loads, filter(None, lines)) if int(r["step"]) <= step]
            self._rewrite()
        cand = self.directory / CANDIDATE_FILE
        if cand.is_file():
            import torch

            saved = torch.load(cand, map_location="cpu")
            if int(saved["step"]) <= step:
                self.candidate_step = int(saved["step"])
            else:
                cand.unlink()

    def _rewrite(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.log_path.with_name(f".{LOG_FILE}.tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in self.history))
        tmp.replace(self.log_path)

    def record(self, step: int, answers: Answers, weights: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Summarise, detect, append to the log, keep the candidate's weights; returns the record."""
        if self.judge is not None:
            answers = replace(answers, judge_win_rate=self.judge(step, answers))
        record = {"step": step, **summarize(answers, self.score_max, self.watch.samples_kept, self.watch.checks)}
        alarmed_before = self.alarmed
        self.history.append(record)
        record["findings"] = [str(f) for f in detect(self.history, self.watch, self.limit)]
        self._rewrite()
        if not alarmed_before and not record["findings"] and self._is_candidate(record):
            import torch

            tmp = self.directory / f".{CANDIDATE_FILE}.tmp"
            torch.save({"step": step, "state": weights()}, tmp)
            tmp.replace(self.directory / CANDIDATE_FILE)
            self.candidate_step = step
        return record

    def _is_candidate(self, record: dict[str, Any]) -> bool:
        base = self.history[0]
        if drifting(record, base, self.watch):
            return False
        if self.watch.select == "bestReward":
            healthy = [
                r
                for r in self.history
                if r is not record and not r.get("findings") and not drifting(r, base, self.watch)
            ]
            return all(record["score_mean"] >= r["score_mean"] for r in healthy)
        # A rollback restores the candidate, so one is kept under action rollback whatever the selection.
        return self.watch.select == "lastBeforeAlarm" or self.watch.action == "rollback"

    def should_stop(self) -> bool:
        """Training ends here (a Trainer stage, which cannot roll back, also stops on ``rollback``)."""
        return self.decision() != "continue"

    def selection(self, final_step: int) -> tuple[int, str]:
        step, why = select(self.history, self.watch, final_step)
        done = self.rollbacks()
        if done:  # status shows this line: the rollbacks belong in it
            last = done[-1]
            why += f"; rolled back {len(done)}x, last at step {last['step']} to step {last['restoredStep']}"
        return step, why

    def candidate_weights(self, step: int) -> dict[str, Any]:
        import torch

        saved = torch.load(self.directory / CANDIDATE_FILE, map_location="cpu")
        if int(saved["step"]) != step:
            raise RuntimeError(f"the kept candidate is step {saved['step']}, not the selected step {step}")
        return dict(saved["state"])

    def publish(self, output_dir: Path) -> None:
        """Copy the evaluation log into the stage's output."""
        if self.log_path.is_file():
            shutil.copyfile(self.log_path, output_dir / LOG_FILE)

    def summary(self, final_step: int) -> dict[str, Any]:
        """What the manifest keeps (details.watch): the settings, the findings, the choice, the table."""
        step, why = self.selection(final_step)
        table_keys = (
            "step",
            "score_mean",
            "score_std",
            "kl_mean",
            "length_mean",
            "eos_rate",
            "distinct_2",
            "preference_accuracy",
            "check_pass_rate",
            "judge_win_rate",
        )
        return {
            "evalEvery": self.watch.eval_every,
            "action": self.watch.action,
            "klLimit": self.limit,
            "scoreMax": self.score_max,
            "findings": self.findings(),
            "stoppedByAlarm": self.decision() == "stop" and final_step < self.total_steps,
            "rollbacks": self.rollbacks(),
            "selectedStep": step,
            "selection": why,
            "evaluations": [
                {**{k: r[k] for k in table_keys if k in r}, "alarm": bool(r.get("findings"))} for r in self.history
            ],
            "log": LOG_FILE,
        }
