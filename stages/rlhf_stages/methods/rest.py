"""ReST stage: Reinforced Self-Training (Gulcehre et al. 2023), Grow and Improve, repeated.

For each of ``growSteps`` iterations:

* **Grow**: sample ``samplesPerPrompt`` completions for every training prompt from the *current*
  policy and score each with the reward model (prompt + completion + EOS, as the RL stages do).
  The scored set is written to the volume (``rest/grow/grow-<g>.jsonl``, one row per completion:
  prompt, completion, reward, endedWithEos, grow step) for inspection.
* **Improve**: for each threshold ``q`` in ``thresholds`` (rising reward quantiles), keep the
  completions whose reward is at or above the ``q``-quantile of this Grow set's rewards, and
  fine-tune the policy on them (negative log-likelihood of the completion and its EOS given the
  prompt). Each Improve step continues from the previous one, so the policy is fitted to ever
  better samples of the same Grow set; the next Grow samples from the improved policy, so its
  absolute threshold rises too. Completions cut off at ``responseLength.max`` (no EOS) are never
  imitated: copying them would teach the policy not to stop.

The policy is ``sft/model`` (else ``baseModel``) plus a fresh LoRA adapter (or all weights with
``lora.enabled: false``). Each Improve step is a complete checkpoint (``rest.checkpoints/
checkpoint-<n>``: weights, optimizer-free state, the Grow sets so far), so a preempted stage
resumes after its last finished Improve step. SIGTERM stops a Grow step after the current token's
forward pass (its samples are discarded) and an Improve step between optimizer steps (its updates
are discarded: the previous Improve step's checkpoint is the state kept); see ``interrupt``.

Watch (``rest.watch``, docs/watch.md): the policy answers the held-out prompts before the first Grow
step and after every ``watch.evalEvery``-th Improve step (the step counted is the Improve step), with the
detectors of PPO/GRPO/RLOO; ``stop`` ends the loop at the alarm and the output is the evaluated
Improve step ``watch.select`` picks (the final weights then go to ``rest/final/``).

Metrics: ``grow<g>_reward_mean`` per Grow step (the policy's reward on its own samples), the last
Improve loss, and on the held-out prompts ``eval_reward_mean``, ``eval_eos_rate``,
``eval_length_tokens`` (``reward_mean`` is the last Grow mean, for the run's status).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rlhf_stages.methods import common, watch_judge
from rlhf_stages.methods.rest_improve import GrowRow, improve, quantile
from rlhf_stages.runtime import data, models
from rlhf_stages.runtime.atomic import write_json_atomic, write_jsonl_atomic
from rlhf_stages.runtime.checkpoint_dir import CheckpointDir
from rlhf_stages.runtime.context import StageConfigError, StageContext, StageInterrupted, StageOutcome
from rlhf_stages.runtime.interrupt import StepAborted, StepGuard

GENERATION_BATCH = 64


def validate(ctx: StageContext) -> None:
    cfg = ctx.config
    data.check_source(ctx, cfg.dataset, "rest.dataset")
    common.check_prompt_template(cfg.prompt_template, "rest")
    common.check_policy_input(ctx)
    common.check_reward_input(ctx)
    common.check_preference_set(ctx)
    watch_judge.check(ctx)
    if cfg.resources.gpus > 1:  # the Grow/Improve loop is single-process: N ranks would each run all of it
        raise StageConfigError("rest.resources.gpus: ReST runs in one process; use at most 1 GPU")
    if cfg.generation.extra:
        raise StageConfigError("rest.generation.extra: not supported by the Grow sampler (use temperature/topK/topP)")


def grow(
    ctx: StageContext, policy: Any, tokenizer: Any, scorer: tuple[Any, Any], prompts: list[str], *, step: int
) -> list[GrowRow]:
    """Sample ``samplesPerPrompt`` completions per prompt from the current policy and score them."""
    from rlhf_stages.sampling.generate import generate_completions
    from rlhf_stages.sampling.score import score_with_reward_model

    cfg = ctx.config
    repeated = [p for p in prompts for _ in range(cfg.samples_per_prompt)]
    completions = generate_completions(
        policy,
        tokenizer,
        repeated,
        cfg.response_length.max,
        seed=cfg.training.seed * 1000 + step,
        batch_size=GENERATION_BATCH,
        **common.sampling_kwargs(cfg.generation),
    )
    rewards = score_with_reward_model(scorer[0], scorer[1], repeated, completions)
    return [GrowRow(c.prompt, c.text, r, c.ended_with_eos, step) for c, r in zip(completions, rewards, strict=True)]


def checkpoints(ctx: StageContext) -> CheckpointDir:
    """Only the newest checkpoint is kept: each holds the whole state (policy, history, Grow sets' names)."""
    return CheckpointDir(ctx.checkpoints_dir, keep=1)


def _save_checkpoint(ctx: StageContext, policy: Any, n: int, state: dict[str, Any]) -> str:
    """Assemble the checkpoint in ``.incoming``, then publish it: ``checkpoint-<n>`` is always complete."""
    directory = checkpoints(ctx)
    tmp = directory.staging(n)
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(str(tmp / "policy"))
    write_json_atomic(tmp / "state.json", state)
    return directory.publish(n).name


def _load_policy(ctx: StageContext, base: models.ModelLocation, resume: Path | None) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    cfg = ctx.config
    if not cfg.lora.enabled:
        source = models.local(ctx, resume / "policy") if resume else base
        return models.load_model(source, AutoModelForCausalLM, models.Quantization(), "rest", "float32")
    from peft import PeftModel, get_peft_model

    model = models.load_model(base, AutoModelForCausalLM, models.Quantization(), "rest", "float32")
    if resume is not None:
        return PeftModel.from_pretrained(model, str(resume / "policy"), is_trainable=True)
    torch.manual_seed(cfg.training.seed)
    return get_peft_model(model, models.lora_config(cfg.lora, "CAUSAL_LM"))


def watch_evaluator(
    ctx: StageContext,
    policy: Any,
    base: models.ModelLocation,
    tokenizer: Any,
    scorer: tuple[Any, Any],
    prompts: list[str],
) -> Callable[[], Any]:
    """How the watch has the policy answer ``prompts`` (``sampling.watch.sample_answers``, as GRPO/RLOO).

    The reference for the KL is the starting policy: the policy with its LoRA adapter disabled; with
    all weights trained, a frozen copy of it only when ``watch.klLimit`` is set (the only detector
    that needs it; a second full model is not loaded otherwise, and the KL is recorded as NaN)."""
    from transformers import AutoModelForCausalLM

    from rlhf_stages.methods.watching import preference_pairs, with_preferences
    from rlhf_stages.sampling.watch import sample_answers

    cfg = ctx.config
    frozen = None
    if not cfg.lora.enabled and cfg.watch.kl_limit is not None:
        frozen = models.load_model(base, AutoModelForCausalLM, models.Quantization(), "rest", "float32").eval()
        frozen.requires_grad_(False)

    @contextmanager
    def reference() -> Iterator[Any]:
        if cfg.lora.enabled:
            with policy.disable_adapter():
                yield policy
        else:
            yield frozen

    pairs = preference_pairs(ctx, cfg.training.seed)

    def evaluate() -> Any:
        answers = sample_answers(
            policy,
            tokenizer,
            prompts,
            reference=reference,
            reward_model=scorer[0],
            reward_tokenizer=scorer[1],
            max_new_tokens=cfg.response_length.max,
            **common.sampling_kwargs(cfg.generation),
        )
        return with_preferences(answers, policy, tokenizer, pairs)

    return evaluate


def run(ctx: StageContext) -> StageOutcome:
    from transformers import AutoModelForSequenceClassification

    from rlhf_stages.methods import watching

    cfg, t = ctx.config, ctx.config.training
    base = common.policy_location(ctx)
    tokenizer = models.load_tokenizer(base)
    reward_at = common.reward_location(ctx)
    reward_tokenizer = models.load_tokenizer(reward_at)
    reward_model = models.load_model(
        reward_at,
        AutoModelForSequenceClassification,
        models.Quantization(),
        "rest.rewardModel",
        "float32",
        num_labels=1,
    ).eval()
    reward_model.config.pad_token_id = reward_tokenizer.pad_token_id

    rows = data.load_rows(ctx, cfg.dataset, t.seed)
    train_ds, eval_ds = data.split_eval(
        common.prompts(rows, cfg.prompt_template, "rest"), cfg.dataset.eval_fraction, t.seed
    )
    prompts = list(train_ds["prompt"])

    resume = checkpoints(ctx).latest()
    state: dict[str, Any] = {"done": 0, "history": [], "grow_files": []}
    if resume is not None:
        state = json.loads((resume[1] / "state.json").read_text(encoding="utf-8"))
        print(f"rlhf-stage: resuming rest after improve step {state['done']}", flush=True)
    policy = _load_policy(ctx, base, resume[1] if resume else None)
    ctx.checkpoints_dir.mkdir(parents=True, exist_ok=True)

    total = cfg.grow_steps * len(cfg.thresholds)
    watcher = watching.make_watcher(ctx, None, total)  # no KL target: klBeyondLimit only with watch.klLimit
    evaluate = None
    if watcher.enabled and ctx.is_main:
        watcher.resume(state["done"])
        held_out = list(eval_ds["prompt"]) if eval_ds is not None else []
        watched = watching.watch_prompts(held_out, prompts, cfg.watch.eval_prompts)
        evaluate = watch_evaluator(ctx, policy, base, tokenizer, (reward_model, reward_tokenizer), watched)

    def watch_says_stop(step: int) -> bool:
        """Evaluate at ``step`` when due; whether an alarm ends the loop here (also when resumed past one)."""
        if evaluate is None:
            return False
        if watcher.due(step):
            watching.log_record(ctx, watcher.record(step, evaluate(), lambda: models.trainable_state(policy)))
        return watcher.should_stop() and step < total

    # The baseline before the first Grow step or, resumed, an evaluation the restart interrupted.
    stopped_by_alarm = watch_says_stop(state["done"])
    guard = StepGuard(ctx.stop_requested, (policy, reward_model), stage="rest", total=total)
    grow_rows: list[GrowRow] = []
    for g in range(cfg.grow_steps):
        if stopped_by_alarm:
            break
        if state["done"] >= (g + 1) * len(cfg.thresholds):
            continue  # this Grow step and its Improve steps finished before a restart
        grow_file = ctx.checkpoints_dir / f"grow-{g}.jsonl"
        if grow_file.exists():  # sampled before the restart: reuse exactly that set
            grow_rows = [GrowRow.from_json(line) for line in grow_file.read_text(encoding="utf-8").splitlines()]
        else:
            try:  # SIGTERM while sampling: the partial Grow set is discarded, the last Improve step kept
                with guard.phase(state["done"] + 1, f"sampling (grow {g}: {len(prompts) * cfg.samples_per_prompt})"):
                    grow_rows = grow(ctx, policy, tokenizer, (reward_model, reward_tokenizer), prompts, step=g)
            except StepAborted as aborted:
                print(f"rlhf-stage: {aborted}; keeping improve step {state['done']}", file=sys.stderr, flush=True)
                raise StageInterrupted(
                    state["done"], f"checkpoint-{state['done']}" if state["done"] else None
                ) from None
            write_jsonl_atomic(grow_file, [r.to_json() for r in grow_rows])
        if grow_file.name not in state["grow_files"]:
            state["grow_files"].append(grow_file.name)
        rewards = [r.reward for r in grow_rows]
        if not any(e.get("grow") == g and "reward_mean" in e for e in state["history"]):
            state["history"].append(
                {
                    "grow": g,
                    "reward_mean": sum(rewards) / len(rewards),
                    "eos_rate": sum(r.ended_with_eos for r in grow_rows) / len(grow_rows),
                }
            )
        for i, q in enumerate(cfg.thresholds):
            n = g * len(cfg.thresholds) + i + 1
            if n <= state["done"]:
                continue
            tau = quantile(rewards, q)
            kept = [r for r in grow_rows if r.reward >= tau and r.ended_with_eos]
            loss, stopped = improve(ctx, policy, tokenizer, kept, t, seed=t.seed + n)
            state["history"].append(
                {"improve": n, "grow": g, "quantile": q, "threshold": tau, "kept": len(kept), "loss": loss}
            )
            if stopped:
                raise StageInterrupted(state["done"], None if not state["done"] else f"checkpoint-{state['done']}")
            state["done"] = n
            if ctx.is_main:
                _save_checkpoint(ctx, policy, n, state)
            progress = {"threshold": tau, "kept": float(len(kept))} | ({"loss": loss} if loss is not None else {})
            ctx.write_progress(n, total, progress, force=True)
            if watch_says_stop(n):
                stopped_by_alarm = True
                break

    guard.close()  # the held-out evaluation below always completes
    metrics: dict[str, float] = {}
    for entry in state["history"]:
        if "reward_mean" in entry:
            metrics[f"grow{entry['grow']}_reward_mean"] = entry["reward_mean"]
            metrics["reward_mean"] = entry["reward_mean"]
    losses = [e["loss"] for e in state["history"] if "loss" in e and e["loss"] is not None]
    if losses:
        metrics["improve_loss"] = losses[-1]
    concluded = watching.Concluded()
    if ctx.is_main:
        # Before the held-out numbers and the save below: they are the chosen policy's.
        concluded = watching.conclude(
            ctx,
            watcher,
            state["done"],
            save_final=lambda: common.save_policy(ctx, policy, tokenizer, base, cfg.lora.enabled, under="final"),
            load_weights=lambda weights: models.load_trainable_state(policy, weights),
        )
        metrics.update(concluded.metrics)
    if eval_ds is not None:
        metrics.update(
            common.evaluate_held_out(
                policy,
                tokenizer,
                list(eval_ds["prompt"]),
                max_new_tokens=cfg.response_length.max,
                seed=t.seed,
                reward_model=reward_model,
                reward_tokenizer=reward_tokenizer,
            )
        )
    if ctx.is_main:
        common.save_policy(ctx, policy, tokenizer, base, cfg.lora.enabled)
        (ctx.staging_dir / "grow").mkdir()
        for name in state["grow_files"]:
            shutil.copy2(ctx.checkpoints_dir / name, ctx.staging_dir / "grow" / name)
    return StageOutcome(
        metrics=metrics,
        step=state["done"],
        total_steps=total,
        inputs={
            "policy": base.label,
            "rewardModel": reward_at.label,
            "dataset": data.source_summary(ctx, cfg.dataset),
            "trainPrompts": len(prompts),
            "evalPrompts": len(eval_ds) if eval_ds is not None else 0,
        },
        details={
            "resumedFromStep": resume[0] if resume else None,
            "history": state["history"],
            "growDatasets": [f"grow/{name}" for name in state["grow_files"]],
            "watch": concluded.summary,
        },
        findings=concluded.findings,
        selected_step=concluded.selected_step,
        selection=concluded.selection,
        evaluations=concluded.evaluations,
        message="ReST done: grow reward means "
        + ", ".join(f"{e['reward_mean']:.3f}" for e in state["history"] if "reward_mean" in e)
        + (
            f"; output = improve step {concluded.selected_step} of {state['done']} ({concluded.selection})"
            if concluded.summary and concluded.selected_step != state["done"]
            else ""
        ),
    )
