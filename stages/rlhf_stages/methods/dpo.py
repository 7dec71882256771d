"""DPO stage: direct preference optimisation of the policy on chosen/rejected pairs (TRL DPOTrainer).

Policy: ``sft/model`` when SFT ran (else the base model) plus a fresh LoRA adapter. With LoRA the
reference model is the same weights with the adapter disabled (DPOTrainer does this itself when
it gets a PEFT model and no ``ref_model``), so no second copy is held in memory; without LoRA
DPOTrainer loads a frozen copy of the starting model as the reference.

Pairs: ``prompt``/``chosen``/``rejected`` with the prompt rendered by ``promptTemplate`` (the tiny
data already holds a rendered prompt: use ``promptTemplate: "{prompt}"``), or hh-rlhf transcripts.
Under method RLAIF they are the rlaif stage's labelled pairs (``rlaif/pairs.jsonl``, prompts
rendered) and ``rlaif.evalFraction`` of them are held out; otherwise ``dpo.dataset`` and its
``evalFraction``. DPOTrainer appends EOS to chosen and rejected, so the policy learns when a good
answer *ends*.

Loss: ``beta`` (strength of the implicit KL constraint) and ``lossType`` (sigmoid = DPO, hinge =
SLiC, ipo, robust/exo_pair with ``labelSmoothing``, bco_pair, sppo_hard, nca_pair).

Metrics: ``eval_preference_accuracy`` (held-out pairs where the implicit reward
``beta * log(pi/ref)`` ranks chosen above rejected), ``eval_reward_margin``, ``eval_loss``, and the
policy evaluation on the held-out prompts (``eval_eos_rate``, ``eval_length_tokens``).

Output: ``dpo/adapter`` (merged by the merge stage) or ``dpo/model``, with the tokenizer.
"""

from __future__ import annotations

from rlhf_stages.methods import common
from rlhf_stages.runtime import data, models
from rlhf_stages.runtime.context import StageConfigError, StageContext, StageOutcome

# TRL's names for the held-out numbers, and ours (the status shows ours).
EVAL_KEYS = {
    "eval_rewards/accuracies": "eval_preference_accuracy",
    "eval_rewards/margins": "eval_reward_margin",
    "eval_loss": "eval_loss",
}
EVAL_MAX_NEW_TOKENS = 32


def validate(ctx: StageContext) -> None:
    cfg = ctx.config
    common.check_pairs_input(ctx)
    models.check_quantization(cfg.quantization, "dpo", cfg.resources.gpus)
    common.check_prompt_template(cfg.prompt_template, "dpo")
    common.check_policy_input(ctx)


def run(ctx: StageContext) -> StageOutcome:
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from rlhf_stages.runtime.training import final_metrics, make_trainer, run_trainer, weights_to_save

    cfg, t = ctx.config, ctx.config.training
    base = common.policy_location(ctx)
    tokenizer = models.load_tokenizer(base)

    source, template = common.pairs_source(ctx)
    rows = data.load_rows(ctx, source, t.seed)
    pairs = common.preference_pairs(rows, template, "dpo")
    train_ds, eval_ds = data.split_eval(pairs, source.eval_fraction, t.seed)
    if len(train_ds) == 0:
        raise StageConfigError("dpo.dataset: no usable preference pairs")

    model = models.load_model(base, AutoModelForCausalLM, cfg.quantization, "dpo", "float32")
    peft_config = models.lora_config(cfg.lora, "CAUSAL_LM") if cfg.lora.enabled else None
    trainer, callback = make_trainer(
        ctx,
        DPOTrainer,
        DPOConfig,
        t,
        has_eval=eval_ds is not None,
        config={
            "beta": cfg.beta,
            "loss_type": [cfg.loss_type],
            "label_smoothing": cfg.label_smoothing,
            "max_length": t.max_length,
            # Keep the end of long prompts: the answer must stay in the window.
            "truncation_mode": "keep_end",
            "dataset_num_proc": None,
        },
        model=model,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    train_output, resumed_from = run_trainer(ctx, trainer, callback)
    metrics = final_metrics(train_output, None, ())
    if eval_ds is not None:
        evaluated = trainer.evaluate()
        metrics.update({ours: float(evaluated[theirs]) for theirs, ours in EVAL_KEYS.items() if theirs in evaluated})
        metrics.update(
            common.evaluate_held_out(
                trainer.model, tokenizer, list(eval_ds["prompt"]), max_new_tokens=EVAL_MAX_NEW_TOKENS, seed=t.seed
            )
        )

    trained, state = weights_to_save(ctx, trainer)  # every rank: collective under FSDP
    if ctx.is_main:
        common.save_policy(ctx, trained, tokenizer, base, cfg.lora.enabled, state_dict=state)
    return StageOutcome(
        metrics=metrics,
        step=trainer.state.global_step,
        total_steps=trainer.state.max_steps,
        inputs={
            "policy": base.label,
            "dataset": data.source_summary(ctx, source),
            "trainPairs": len(train_ds),
            "evalPairs": len(eval_ds) if eval_ds is not None else 0,
        },
        details={
            "resumedFromStep": resumed_from,
            "beta": cfg.beta,
            "lossType": cfg.loss_type,
            "reference": "policy with the adapter disabled" if cfg.lora.enabled else "frozen copy of the policy",
            "logHistory": callback.history[-50:],
        },
        message=f"DPO done: eval_preference_accuracy={metrics.get('eval_preference_accuracy', float('nan')):.3f}",
    )
