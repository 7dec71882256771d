"""Reward stage: a pairwise reward model (chosen scored above rejected) with TRL RewardTrainer.

Base: ``reward.model`` when set (e.g. a DeBERTa-style encoder), else this run's SFT output, else
the base model; loaded as ``AutoModelForSequenceClassification`` with one label and a pad token.

Pairs: ``reward.dataset``, or under method RLAIF the rlaif stage's labelled pairs.
Texts: with a ``prompt`` column (or whatever ``promptTemplate`` reads) the scored text is
``render(promptTemplate) + chosen``; without one, ``chosen``/``rejected`` are whole transcripts
(hh-rlhf). Every text is tokenized with the tokenizer's own special tokens and, when the tokenizer
has an EOS token, ends with it: PPO scores finished responses the same way (prompt + response +
EOS), so a reward model must learn what a *complete* answer looks like. Pairs longer than
``maxLength`` are dropped (truncating would cut the EOS the score is read at).

Metrics: held-out pair accuracy (``eval_accuracy``) and mean margin (``eval_margin``), computed
over every held-out pair. Output: ``reward/model`` (standalone, LoRA merged) with its tokenizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlhf_api import layout
from rlhf_stages.methods import common
from rlhf_stages.runtime import data, models
from rlhf_stages.runtime.context import StageConfigError, StageContext, StageInputMissing, StageOutcome
from rlhf_stages.runtime.outputs import completed_manifest

if TYPE_CHECKING:
    from datasets import Dataset


def base_location(ctx: StageContext) -> models.ModelLocation:
    """reward.model, else the SFT output of this run (when SFT ran), else the base model."""
    if ctx.config.model is not None:
        return models.locate(ctx, ctx.config.model)
    sft_model = layout.policy_base(ctx.spec, ctx.stage, ctx.invocation.run_dir)
    if sft_model is not None:
        return models.local(ctx, ctx.workspace / sft_model)
    return models.locate(ctx, ctx.spec.base_model)


def validate(ctx: StageContext) -> None:
    cfg = ctx.config
    common.check_pairs_input(ctx)
    models.check_quantization(cfg.quantization, "reward", cfg.resources.gpus)
    on_sft = cfg.model is None and layout.policy_base(ctx.spec, ctx.stage, ctx.invocation.run_dir) is not None
    if on_sft and completed_manifest(ctx.stage_output_of("sft")) is None:
        raise StageInputMissing("reward: the SFT stage's output is not complete (runs/.../sft/manifest.json)")
    models.check_model_dir(base_location(ctx), "reward.model")


def pair_texts(ds: Dataset, template: str) -> Dataset:
    """Rows -> ``chosen``/``rejected`` texts to score (prompt rendered in front when there is one)."""
    data.check_columns(ds, ["chosen", "rejected"], "reward.dataset")
    fields = data.template_fields(template)
    with_prompt = all(f in ds.column_names for f in fields) and bool(fields)
    if not with_prompt and "prompt" in ds.column_names:
        missing = [f for f in fields if f not in ds.column_names]
        raise StageConfigError(f"reward.promptTemplate reads {missing}, which the dataset lacks ({ds.column_names})")

    def texts(row: dict[str, Any]) -> dict[str, str]:
        prefix = data.render(template, row) if with_prompt else ""
        return {"chosen": prefix + row["chosen"], "rejected": prefix + row["rejected"]}

    return ds.map(texts, remove_columns=ds.column_names)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids as scored: the tokenizer's special tokens, then EOS if it has one and it is missing."""
    ids = list(tokenizer(text)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


def tokenize_pairs(ds: Dataset, tokenizer: Any, max_length: int) -> tuple[Dataset, int]:
    """``chosen_ids``/``rejected_ids`` (what RewardTrainer takes as already processed); drops long pairs."""

    def ids(row: dict[str, str]) -> dict[str, list[int]]:
        return {"chosen_ids": encode(tokenizer, row["chosen"]), "rejected_ids": encode(tokenizer, row["rejected"])}

    tokenized = ds.map(ids, remove_columns=ds.column_names)
    kept = tokenized.filter(lambda r: len(r["chosen_ids"]) <= max_length and len(r["rejected_ids"]) <= max_length)
    return kept, len(tokenized) - len(kept)


def score_ids(model: Any, sequences: list[list[int]], pad_id: int, batch_size: int = 32) -> list[float]:
    """Scalar scores of token sequences (right padding; the model reads the last non-pad token)."""
    import torch

    device = next(model.parameters()).device
    scores: list[float] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start : start + batch_size]
            width = max(len(s) for s in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, seq in enumerate(batch):
                ids[i, : len(seq)] = torch.tensor(seq)
                mask[i, : len(seq)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            scores.extend(logits[:, 0].float().cpu().tolist())
    return scores


def pair_metrics(model: Any, pairs: Dataset, pad_id: int, batch_size: int) -> dict[str, float]:
    """Exact accuracy and mean margin over every pair."""
    chosen = score_ids(model, pairs["chosen_ids"], pad_id, batch_size)
    rejected = score_ids(model, pairs["rejected_ids"], pad_id, batch_size)
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return {
        "eval_accuracy": sum(m > 0 for m in margins) / len(margins),
        "eval_margin": sum(margins) / len(margins),
    }


SCORE_RANGE_PAIRS = 512  # training pairs scored for the range (with every held-out pair): a bound on the cost


def own_score_range(model: Any, train: Dataset, held: Dataset | None, pad_id: int, batch_size: int) -> dict[str, float]:
    """The scores the model gives the answers of its own data (chosen and rejected; up to
    SCORE_RANGE_PAIRS training pairs and every held-out one). PPO's watch flags answers above ``max``:
    the model never saw such text, so its score there is extrapolation (docs/watch.md)."""
    sets = [train.select(range(min(len(train), SCORE_RANGE_PAIRS)))] + ([held] if held is not None else [])
    scores = [
        s
        for ds in sets
        if len(ds)
        for column in ("chosen_ids", "rejected_ids")
        for s in score_ids(model, ds[column], pad_id, batch_size)
    ]
    ordered = sorted(scores)
    return {
        "min": ordered[0],
        "max": ordered[-1],
        "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "answers": float(len(ordered)),
    }


def run(ctx: StageContext) -> StageOutcome:
    from transformers import AutoModelForSequenceClassification, set_seed
    from trl import RewardConfig, RewardTrainer

    from rlhf_stages.runtime.training import final_metrics, make_trainer, run_trainer, weights_to_save

    cfg, t = ctx.config, ctx.config.training
    base = base_location(ctx)
    tokenizer = models.load_tokenizer(base)

    source, template = common.pairs_source(ctx)
    rows = data.load_rows(ctx, source, t.seed)
    train_rows, eval_rows = data.split_eval(pair_texts(rows, template), source.eval_fraction, t.seed)
    train_ds, dropped = tokenize_pairs(train_rows, tokenizer, cfg.max_length)
    eval_ds, eval_dropped = tokenize_pairs(eval_rows, tokenizer, cfg.max_length) if eval_rows else (None, 0)
    if len(train_ds) == 0:
        raise StageConfigError(f"reward.maxLength: every pair is longer than {cfg.max_length} tokens")

    dtype = models.training_dtype(t.bf16, t.fp16)
    # The score head is freshly initialised from torch's global RNG while loading (the Trainer only
    # seeds later): without this, identical runs train different reward models.
    set_seed(t.seed)
    model = models.load_model(
        base,
        AutoModelForSequenceClassification,
        cfg.quantization,
        "reward",
        "float32",
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    peft_config = models.lora_config(cfg.lora, "SEQ_CLS") if cfg.lora.enabled else None

    has_eval = eval_ds is not None and len(eval_ds) > 0
    trainer, callback = make_trainer(
        ctx,
        RewardTrainer,
        RewardConfig,
        t,
        has_eval=has_eval,
        config={"max_length": cfg.max_length, "disable_dropout": True},
        model=model,
        train_dataset=train_ds,
        eval_dataset=eval_ds if has_eval else None,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    train_output, resumed_from = run_trainer(ctx, trainer, callback)
    metrics = final_metrics(train_output, None, ())
    if eval_ds is not None and len(eval_ds):
        metrics.update(pair_metrics(trainer.model, eval_ds, tokenizer.pad_token_id, t.per_device_eval_batch_size))
    score_range = own_score_range(
        trainer.model, train_ds, eval_ds, tokenizer.pad_token_id, t.per_device_eval_batch_size
    )

    trained, state = weights_to_save(ctx, trainer)  # every rank: collective under FSDP
    if ctx.is_main:
        from transformers import AutoModelForSequenceClassification

        common.save_trained(
            ctx,
            trained,
            state,
            tokenizer,
            base,
            dtype,
            AutoModelForSequenceClassification,
            num_labels=1,
            pad_token_id=tokenizer.pad_token_id,
        )
    return StageOutcome(
        metrics=metrics,
        step=trainer.state.global_step,
        total_steps=trainer.state.max_steps,
        inputs={
            "model": base.label,
            "dataset": data.source_summary(ctx, source),
            "trainPairs": len(train_ds),
            "evalPairs": len(eval_ds) if eval_ds is not None else 0,
            "droppedTooLong": dropped + eval_dropped,
        },
        details={
            "resumedFromStep": resumed_from,
            "lora": cfg.lora.enabled,
            "quantization": cfg.quantization.mode,
            "dtype": dtype,
            "eosAppended": tokenizer.eos_token_id is not None,
            "logHistory": callback.history[-50:],
            "scoreRange": score_range,
        },
        message=f"reward model done: eval_accuracy={metrics.get('eval_accuracy', float('nan')):.3f}",
    )
