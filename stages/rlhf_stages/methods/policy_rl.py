"""What GRPO and RLOO share: TRL's online trainers with this run's reward model as the reward.

Both sample ``numGenerations`` completions for each of ``batchSize`` prompts per step, reward every
completion with the reward model and push the policy (``sft/model``: a fresh LoRA adapter on it, or
all its weights with ``lora.enabled`` false) towards the better ones of each group; ``beta`` weighs
the KL to the reference (the policy with the adapter disabled, or a frozen copy of ``sft/model``).

The reward is a callable, not the model itself: given a model, TRL scores ``prompt + completion``
*decoded without special tokens*, i.e. without the EOS that ends a finished answer. Our reward
models are trained on answers that end with EOS (reward.py), and scoring without it was measured
to let the policy learn endless repetition (an unfinished answer looks as good as a finished one).
:class:`RewardModelReward` scores prompt + completion + EOS when the completion ended with EOS,
exactly as ``sampling.score.score_with_reward_model`` and PPO do, and subtracts
``missingEosPenalty`` from answers cut off at ``responseLength.max``.

SIGTERM inside a step (sampling, reference log-probs, the loss: every forward pass before the
update) abandons the step and saves the last completed one (``interrupt``); after the update the
step ends and is saved, as for every Trainer stage (``checkpoints.StageCallback``). With more than
one process only the latter applies.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rlhf_api import TrainingSettings
from rlhf_stages.methods import common, watch_judge
from rlhf_stages.runtime import data, interrupt, models
from rlhf_stages.runtime.context import StageContext, StageOutcome

# TRL's log keys -> the names our status and report use.
LOG_KEYS = {
    "reward": "reward_mean",
    "reward_std": "reward_std",
    "kl": "kl",
    "entropy": "entropy",
    "completions/mean_length": "response_length",
    "completions/clipped_ratio": "truncated_rate",
}


class RewardModelReward:
    """A TRL reward function: reward-model score of prompt + completion (+ EOS when it ended)."""

    __name__ = "reward_model"  # TRL names logged rewards after the function

    def __init__(self, model: Any, tokenizer: Any, eos_ids: set[int], missing_eos_penalty: float | None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.penalty = missing_eos_penalty

    @classmethod
    def for_policy(
        cls, policy: Any, tokenizer: Any, reward_model: Any, reward_tokenizer: Any, missing_eos_penalty: float | None
    ) -> RewardModelReward:
        """A reward whose idea of a finished answer is the policy's: TRL stops sampling at the
        tokenizer's EOS and at the model's ``generation_config`` EOS ids, so must we."""
        from rlhf_stages.sampling.generate import eos_ids

        return cls(reward_model, reward_tokenizer, set(eos_ids(policy, tokenizer)), missing_eos_penalty)

    def ended(self, completion_ids: list[list[int]]) -> list[bool]:
        """Which completions ended with an EOS (the others were cut off at the length limit)."""
        return [bool(ids) and ids[-1] in self.eos_ids for ids in completion_ids]

    def __call__(
        self, prompts: list[str], completions: list[str], completion_ids: list[list[int]], **_: Any
    ) -> list[float]:
        from rlhf_stages.sampling.score import score_with_reward_model

        ended = self.ended(completion_ids)
        scores = score_with_reward_model(self.model, self.tokenizer, prompts, completions, ended_with_eos=ended)
        if self.penalty is not None:
            scores = [s if done else s - self.penalty for s, done in zip(scores, ended, strict=True)]
        return scores


def validate(ctx: StageContext) -> None:
    cfg = ctx.config
    data.check_source(ctx, cfg.dataset, f"{ctx.stage}.dataset")
    models.check_quantization(cfg.quantization, ctx.stage, cfg.resources.gpus)
    common.check_prompt_template(cfg.prompt_template, ctx.stage)
    common.check_policy_input(ctx)
    common.check_reward_input(ctx)
    common.check_generation_extra(ctx)
    common.check_preference_set(ctx)
    watch_judge.check(ctx)


def training_settings(cfg: Any) -> TrainingSettings:
    """Our on-policy fields as the TrainingSettings every Trainer-based stage maps onto TRL."""
    return TrainingSettings(
        learning_rate=cfg.learning_rate,
        max_steps=cfg.total_steps,
        # One optimizer step = batchSize prompts x numGenerations completions.
        per_device_train_batch_size=cfg.batch_size * cfg.num_generations,
        lr_scheduler_type="constant",
        logging_steps=max(1, min(10, cfg.total_steps // 5)),
        save_steps=cfg.save_freq,
        save_total_limit=2,
        seed=cfg.seed,
    )


def shared_config(cfg: Any, tokenizer: Any) -> dict[str, Any]:
    """Config arguments GRPOConfig and RLOOConfig have in common."""
    return {
        "num_generations": cfg.num_generations,
        "steps_per_generation": 1,  # every step samples afresh: on-policy
        "num_iterations": 1,
        "max_completion_length": cfg.response_length.max,
        "temperature": cfg.generation.temperature,
        "top_p": cfg.generation.top_p,
        "top_k": cfg.generation.top_k,
        "generation_kwargs": {"min_new_tokens": cfg.response_length.min, **cfg.generation.extra},
        "beta": cfg.beta,
        "disable_dropout": True,
        # Truncated answers are penalised through the reward (missingEosPenalty), not dropped.
        "mask_truncated_completions": False,
        "log_completions": False,
    }


def run_online(ctx: StageContext, trainer_class: Any, config_class: Any, extra: dict[str, Any]) -> StageOutcome:
    """Train with ``trainer_class`` (GRPOTrainer or RLOOTrainer); the stage modules only pick the class."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf_stages.methods import watching
    from rlhf_stages.runtime.training import make_trainer, run_trainer

    cfg = ctx.config
    base = common.policy_location(ctx)
    tokenizer = models.load_tokenizer(base)
    reward_at = common.reward_location(ctx)
    reward_tokenizer = models.load_tokenizer(reward_at)
    reward_model = models.load_model(
        reward_at,
        AutoModelForSequenceClassification,
        models.Quantization(),
        f"{ctx.stage}.rewardModel",
        "float32",
        num_labels=1,
    ).eval()
    reward_model.config.pad_token_id = reward_tokenizer.pad_token_id
    for p in reward_model.parameters():
        p.requires_grad_(False)

    rows = data.load_rows(ctx, cfg.dataset, cfg.seed)
    prompt_ds = common.prompts(rows, cfg.prompt_template, ctx.stage)
    train_ds, eval_ds = data.split_eval(prompt_ds, cfg.dataset.eval_fraction, cfg.seed)

    model = models.load_model(base, AutoModelForCausalLM, cfg.quantization, ctx.stage, "float32")
    peft_config = models.lora_config(cfg.lora, "CAUSAL_LM") if cfg.lora.enabled else None
    reward = RewardModelReward.for_policy(model, tokenizer, reward_model, reward_tokenizer, cfg.missing_eos_penalty)

    trainer, callback = make_trainer(
        ctx,
        trainer_class,
        config_class,
        training_settings(cfg),
        has_eval=False,
        config={**shared_config(cfg, tokenizer), **extra},
        model=model,
        reward_funcs=reward,
        train_dataset=train_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    watcher = watching.make_watcher(ctx, None)  # no KL target: klBeyondLimit only with watch.klLimit
    if watcher.enabled:
        trainer.add_callback(
            watch_callback(
                ctx,
                trainer,
                watcher,
                tokenizer,
                reward_model,
                reward_tokenizer,
                watching.watch_prompts(
                    list(eval_ds["prompt"]) if eval_ds is not None else [],
                    list(train_ds["prompt"]),
                    cfg.watch.eval_prompts,
                ),
            )
        )
    # SIGTERM mid-step (e.g. while sampling): abandon the step and save the last completed one.
    # One process only: ranks aborting at different points would leave a collective waiting.
    guard = None
    if ctx.world_size == 1:
        models_used = (trainer.model, getattr(trainer, "ref_model", None), reward_model)
        guard = interrupt.StepGuard(ctx.stop_requested, models_used, stage=ctx.stage, total=cfg.total_steps)
        trainer.add_callback(interrupt.trainer_callback(guard))
    try:
        _, resumed_from = run_trainer(ctx, trainer, callback)
    except interrupt.StepAborted as aborted:
        raise interrupt.save_trainer_after_abort(ctx, trainer, callback, aborted) from None
    finally:
        if guard is not None:
            guard.close()

    logs = callback.latest_logs
    metrics = {ours: float(logs[theirs]) for theirs, ours in LOG_KEYS.items() if theirs in logs}
    step = trainer.state.global_step
    concluded = watching.Concluded()
    if ctx.is_main:
        # Before the held-out numbers and the save below: they are the chosen policy's.
        concluded = watching.conclude(
            ctx,
            watcher,
            step,
            save_final=lambda: common.save_policy(ctx, trainer.model, tokenizer, base, cfg.lora.enabled, under="final"),
            load_weights=lambda state: models.load_trainable_state(
                trainer.accelerator.unwrap_model(trainer.model), state
            ),
        )
        metrics.update(concluded.metrics)
    if eval_ds is not None:
        metrics.update(
            common.evaluate_held_out(
                trainer.model,
                tokenizer,
                list(eval_ds["prompt"]),
                max_new_tokens=cfg.response_length.max,
                seed=cfg.seed,
                reward_model=reward_model,
                reward_tokenizer=reward_tokenizer,
            )
        )
    if ctx.is_main:
        common.save_policy(ctx, trainer.model, tokenizer, base, cfg.lora.enabled)
    return StageOutcome(
        metrics=metrics,
        step=trainer.state.global_step,
        total_steps=trainer.state.max_steps,
        inputs={
            "policy": base.label,
            "rewardModel": reward_at.label,
            "dataset": data.source_summary(ctx, cfg.dataset),
            "trainPrompts": len(train_ds),
            "evalPrompts": len(eval_ds) if eval_ds is not None else 0,
        },
        details={
            "resumedFromStep": resumed_from,
            "beta": cfg.beta,
            "numGenerations": cfg.num_generations,
            "rewardScoredWithEos": True,
            "logHistory": callback.history[-50:],
            "watch": concluded.summary,
        },
        findings=concluded.findings,
        selected_step=concluded.selected_step,
        selection=concluded.selection,
        evaluations=concluded.evaluations,
        message=f"{ctx.stage.upper()} done: reward_mean={metrics.get('reward_mean', float('nan')):.3f}, "
        f"eval_reward_mean={metrics.get('eval_reward_mean', float('nan')):.3f}"
        + (
            f"; output = step {concluded.selected_step} of {step} ({concluded.selection})"
            if concluded.summary and concluded.selected_step != step
            else ""
        ),
    )


def watch_callback(
    ctx: StageContext,
    trainer: Any,
    watcher: Any,
    tokenizer: Any,
    reward_model: Any,
    reward_tokenizer: Any,
    prompts: list[str],
) -> Any:
    """The watch's hook into TRL's trainer: the policy answers ``prompts`` with the stage's sampling
    settings; the reference is the policy with its LoRA adapter disabled, else TRL's frozen copy
    (none when ``beta`` is 0 and all weights train: the KL is then not measured). Under ``action:
    rollback`` (admitted only with ``beta`` > 0) an alarm puts back the kept candidate's weights,
    clears the optimizer's moments (they point along the path that led to the alarm) and multiplies
    TRL's ``beta``, the KL weight it reads at every step, by ``rollbackKlFactor``. The learning rate
    schedule is constant (``training_settings``) and every step samples afresh
    (``steps_per_generation`` 1), so nothing else carries the path to the alarm."""
    from rlhf_stages.methods.watching import WatchCallback, preference_pairs, with_preferences
    from rlhf_stages.sampling.watch import sample_answers

    cfg = ctx.config

    def policy() -> Any:
        return trainer.accelerator.unwrap_model(trainer.model)

    @contextmanager
    def reference() -> Iterator[Any]:
        model = policy()
        if getattr(trainer, "ref_model", None) is not None:
            yield trainer.accelerator.unwrap_model(trainer.ref_model)
        elif hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                yield model
        else:
            yield None

    pairs = preference_pairs(ctx)

    def evaluate() -> Any:
        answers = sample_answers(
            policy(),
            tokenizer,
            prompts,
            reference=reference,
            reward_model=reward_model,
            reward_tokenizer=reward_tokenizer,
            max_new_tokens=cfg.response_length.max,
            temperature=cfg.generation.temperature,
            top_k=cfg.generation.top_k,
            top_p=cfg.generation.top_p,
        )
        return with_preferences(answers, policy(), tokenizer, pairs)

    rollback = (
        trainer_rollback(trainer, cfg.beta, cfg.watch.rollback_kl_factor) if cfg.watch.action == "rollback" else None
    )
    return WatchCallback(ctx, watcher, evaluate, lambda: models.trainable_state(policy()), rollback)


def trainer_rollback(trainer: Any, beta: float, factor: float) -> Any:
    """``watch.action: rollback`` on a TRL trainer (see :func:`watch_callback`): restore the policy's
    trainable weights and clear the optimizer's moments; after ``n`` rollbacks ``beta`` x factor ** n."""
    from rlhf_stages.methods.watching import Rollback, check_ranks_restored

    def restore(state: dict[str, Any]) -> None:
        policy = trainer.accelerator.unwrap_model(trainer.model)
        models.load_trainable_state(policy, state)
        trainer.optimizer.state.clear()
        check_ranks_restored(policy)

    def strengthen(rollbacks: int) -> dict[str, Any]:
        trainer.beta = beta * factor**rollbacks
        return {"beta": trainer.beta}

    return Rollback(restore, strengthen)
