"""PPO stage: the policy (SFT model + a fresh LoRA adapter, or all weights) against the reward model.

TRL removed its PPOTrainer, so the algorithm is the project's own, on transformers + peft +
accelerate, split into: ``ppo_rollout`` (sampling, log-probs, values), ``ppo_advantages`` (KL
penalty, KL controller, GAE, whitening), ``ppo_losses`` (clipped objectives), ``ppo_models``
(policy/reference/value/reward models), ``ppo_checkpoint`` and ``ppo_trainer`` (the loop).

Inputs: the policy starts from ``sft/model`` when SFT ran (else ``spec.baseModel``); the reward
model is ``ppo.rewardModel`` or this run's ``reward/model``. Prompts are the dataset's rows rendered
with ``promptTemplate``; ``dataset.evalFraction`` of them are held out and used once at the end
(``eval_reward_mean``, ``eval_eos_rate``).

Output: ``ppo/adapter`` (LoRA; merged by the merge stage) or ``ppo/model`` (all weights), with the
tokenizer. Metrics: the last step's PPO statistics (``reward_mean``, ``kl``, ``entropy``,
``clip_frac``, ``approx_kl``, ``policy_loss``, ``value_loss``, ``explained_variance``, ``kl_coef``,
``response_length``, ``eos_rate``) plus the eval ones; the whole history is in the manifest.

Watch (``ppo.watch``; ``sampling.watch`` and this package's ``watch``): every ``evalEvery`` steps the
policy answers held-out prompts; the records go to ``ppo/evaluations.jsonl``, the detectors' findings
to the result (and so to the RewardHackingSuspected condition), and the output is the evaluated
checkpoint ``select`` picks (the final weights then stay in ``ppo/final/``).

Data parallel: ``rlhf-stage ppo --nproc N`` (torchrun; gloo on CPU, NCCL on GPUs): each rank rolls
out ``batchSize / N`` prompts; see ``ppo_trainer``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from rlhf_stages.methods import common, watch_judge
from rlhf_stages.runtime import data, models
from rlhf_stages.runtime.context import StageConfigError, StageContext, StageInterrupted, StageOutcome

log = logging.getLogger(__name__)

FINAL_METRICS = (
    "reward_mean",
    "reward_std",
    "rm_score_mean",
    "kl",
    "kl_coef",
    "entropy",
    "clip_frac",
    "approx_kl",
    "policy_loss",
    "value_loss",
    "value_clip_frac",
    "explained_variance",
    "response_length",
    "eos_rate",
)


def validate(ctx: StageContext) -> None:
    cfg = ctx.config
    data.check_source(ctx, cfg.dataset, "ppo.dataset")
    models.check_quantization(cfg.quantization, "ppo", cfg.resources.gpus)
    common.check_generation_extra(ctx)
    common.check_prompt_template(cfg.prompt_template, "ppo")
    # Exit 3 when sft/ or reward/ is not complete, as for the other policy stages.
    common.check_policy_input(ctx)
    common.check_reward_input(ctx)
    common.check_preference_set(ctx)
    watch_judge.check(ctx)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.batch_size % world or cfg.mini_batch_size % world:
        raise StageConfigError(
            f"ppo.batchSize ({cfg.batch_size}) and miniBatchSize ({cfg.mini_batch_size}) must be multiples "
            f"of the {world} data-parallel processes"
        )


def load_prompts(ctx: StageContext, tokenizer: Any) -> tuple[list[list[int]], list[list[int]]]:
    """(training, held-out) prompts as token ids, rendered with promptTemplate."""
    cfg = ctx.config
    rows = data.load_rows(ctx, cfg.dataset, cfg.seed)
    data.check_columns(rows, data.template_fields(cfg.prompt_template), "ppo.promptTemplate")
    train, held = data.split_eval(rows, cfg.dataset.eval_fraction, cfg.seed)

    def encode(ds: Any) -> list[list[int]]:
        # Default special tokens, as the SFT trainer tokenised its prompts (e.g. a BOS where the model uses one).
        return [list(tokenizer(data.render(cfg.prompt_template, row))["input_ids"]) for row in ds]

    return encode(train), encode(held) if held is not None else []


def run(ctx: StageContext) -> StageOutcome:
    import torch
    from accelerate import Accelerator

    from rlhf_stages.methods import watching
    from rlhf_stages.methods.ppo import watch as ppo_watch
    from rlhf_stages.methods.ppo.checkpoint import checkpoint_dir
    from rlhf_stages.methods.ppo.models import load_models
    from rlhf_stages.methods.ppo.trainer import CONTINUE, END, ROLLBACK, PPOTrainer
    from rlhf_stages.runtime.checkpoints import (
        STEP_DELAY_ENV,  # imports transformers: not at module level (validate stays light)
    )
    from rlhf_stages.runtime.interrupt import StepGuard

    cfg = ctx.config
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    policy_loc, reward_loc = common.policy_location(ctx), common.reward_location(ctx)
    tokenizer = models.load_tokenizer(models.locate(ctx, ctx.spec.tokenizer) if ctx.spec.tokenizer else policy_loc)
    train_prompts, eval_prompts = load_prompts(ctx, tokenizer)

    torch.manual_seed(cfg.seed)  # the same LoRA initialisation on every rank
    loaded = load_models(policy_loc, reward_loc, tokenizer, cfg, device=accelerator.device)
    # Every rank gets a guard: they agree on aborting a step after sampling (see ppo_trainer).
    guard = StepGuard(
        ctx.stop_requested,
        (loaded.policy, loaded.reference, loaded.value, loaded.reward.model),
        stage="ppo",
        total=cfg.total_steps,
    )
    checkpoints = checkpoint_dir(ctx.checkpoints_dir)
    trainer = PPOTrainer(
        cfg,
        loaded,
        tokenizer,
        train_prompts,
        accelerator=accelerator,
        checkpoints=checkpoints,
        guard=guard,
    )
    if ctx.is_main:
        checkpoints.clear_incoming()  # debris of a kill mid-save
    accelerator.wait_for_everyone()
    resumed_from = trainer.step if trainer.resume() else None
    if resumed_from is not None and ctx.is_main:
        print(f"rlhf-stage: resuming ppo from checkpoint-{resumed_from}", flush=True)
    delay = float(os.environ.get(STEP_DELAY_ENV, "0") or 0)
    ctx.write_progress(trainer.step, cfg.total_steps, force=True)

    watcher = watching.make_watcher(ctx, cfg.kl_target)
    watch_prompts = watching.watch_prompts(eval_prompts, train_prompts, cfg.watch.eval_prompts)
    pairs = watching.preference_pairs(ctx)

    def evaluate(step: int) -> int:
        """Rank 0 evaluates when due, then says what the alarm (if any) asks of the loop."""
        if not ctx.is_main or not watcher.due(step):
            return CONTINUE
        answers = watching.with_preferences(
            ppo_watch.answers(trainer, watch_prompts), trainer.module.policy, tokenizer, pairs
        )
        record = watcher.record(step, answers, lambda: ppo_watch.policy_weights(trainer))
        watching.log_record(ctx, record)
        verdict = watcher.decision()
        if verdict == "rollback":
            return ROLLBACK
        return END if verdict == "stop" and step < cfg.total_steps else CONTINUE

    def rollback() -> None:
        """Every rank: the kept candidate's policy (rank 0 wrote it to the shared volume before the
        verdict was shared) and a stronger KL penalty; rank 0 records it on the alarm's evaluation."""
        restored, state = watcher.load_candidate()
        trainer.restore_policy(state, cfg.watch.rollback_kl_factor)
        watching.check_ranks_restored(trainer.module.policy)
        if ctx.is_main:
            note = watcher.note_rollback(
                restored, {"klCoef": trainer.kl.value, "klTarget": trainer.kl.effective_target}
            )
            log.warning(
                "ppo watch: rollback %d at step %d to step %d's policy, %s",
                note["number"],
                trainer.step,
                restored,
                {k: note[k] for k in ("klCoef", "klTarget")},
            )

    if ctx.is_main and watcher.enabled:
        watcher.resume(trainer.step)
        evaluate(trainer.step)  # the baseline (step 0) or, resumed, nothing new

    def on_step(step: int, stats: dict[str, float]) -> None:
        if ctx.is_main:
            shown = " ".join(
                f"{k}={stats[k]:.4g}"
                for k in (
                    "reward_mean",
                    "kl",
                    "kl_coef",
                    "entropy",
                    "clip_frac",
                    "value_loss",
                    "eos_rate",
                    "response_length",
                )
            )
            log.info("ppo step %d/%d %s", step, cfg.total_steps, shown)
        ctx.write_progress(step, cfg.total_steps, stats)
        if delay:
            time.sleep(delay)

    finished = trainer.train(ctx.stop_requested.is_set, on_step, evaluate if watcher.enabled else None, rollback)
    guard.close()  # the held-out evaluation below always completes
    if not finished:
        newest = checkpoints.latest()
        raise StageInterrupted(trainer.step, newest[1].name if newest else None)

    last = trainer.history[-1] if trainer.history else {}
    metrics = {k: float(last[k]) for k in FINAL_METRICS if k in last}
    concluded = watching.Concluded()
    if ctx.is_main:
        # The final weights stay available beside the chosen ones, which become the output.
        concluded = watching.conclude(
            ctx,
            watcher,
            trainer.step,
            save_final=lambda: common.save_policy(
                ctx, trainer.module.policy, tokenizer, policy_loc, cfg.lora.enabled, under="final"
            ),
            load_weights=lambda state: ppo_watch.load_policy_weights(trainer, state),
        )
        metrics.update(concluded.metrics)
        metrics.update(evaluate_held_out(trainer, eval_prompts[: common.EVAL_PROMPTS_MAX]))  # of the output
        common.save_policy(ctx, trainer.module.policy, tokenizer, policy_loc, cfg.lora.enabled)
    accelerator.wait_for_everyone()
    return StageOutcome(
        metrics=metrics,
        step=trainer.step,
        total_steps=cfg.total_steps,
        inputs={
            "policy": policy_loc.label,
            "rewardModel": reward_loc.label,
            "dataset": data.source_summary(ctx, cfg.dataset),
            "trainPrompts": len(train_prompts),
            "evalPrompts": len(eval_prompts),
        },
        details={
            "resumedFromStep": resumed_from,
            "lora": cfg.lora.enabled,
            "valueModelInit": "reward model" if loaded.value_from_reward_model else "policy base (zero head)",
            "rewardScoring": "token ids" if loaded.reward.per_token else "text (reward model's tokenizer)",
            "processes": accelerator.num_processes,
            "history": trainer.history[-200:],
            "watch": concluded.summary,
        },
        findings=concluded.findings,
        selected_step=concluded.selected_step,
        selection=concluded.selection,
        evaluations=concluded.evaluations,
        message=f"PPO done: reward_mean={metrics.get('reward_mean', float('nan')):.4f} "
        f"kl={metrics.get('kl', float('nan')):.3f}"
        + (
            f"; output = step {concluded.selected_step} of {trainer.step} ({concluded.selection})"
            if concluded.summary and concluded.selected_step != trainer.step
            else ""
        ),
    )


def evaluate_held_out(trainer: Any, prompts: list[list[int]]) -> dict[str, float]:
    """Reward (EOS penalty included) and EOS rate of one sampled response per held-out prompt.

    Rank 0 only, so nothing here may communicate (the training rollout whitens across ranks).
    """
    import torch

    from rlhf_stages.methods.ppo.rollout import sample_budgets

    if not prompts:
        return {}
    cfg = trainer.stage
    scores, eos = [], []
    for start in range(0, len(prompts), trainer.local_batch):
        chunk = prompts[start : start + trainer.local_batch]
        budgets = sample_budgets(
            trainer.generators["budgets"], len(chunk), cfg.response_length.min, cfg.response_length.max
        )
        batch = trainer.sample(trainer.module.policy, chunk, budgets)
        score = trainer.models.reward.score(batch, trainer.tokenizer)
        if cfg.missing_eos_penalty is not None:
            score = score - cfg.missing_eos_penalty * (~batch.ended_with_eos).float()
        scores.append(score)
        eos.append(batch.ended_with_eos.float())
    return {"eval_reward_mean": float(torch.cat(scores).mean()), "eval_eos_rate": float(torch.cat(eos).mean())}
