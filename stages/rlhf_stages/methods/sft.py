"""SFT stage: supervised fine-tuning of the base model (full, LoRA or QLoRA) with TRL SFTTrainer.

Examples become TRL's prompt/completion format, so completion-only loss is TRL's own:

* ``promptTemplate`` over the dataset's columns: the text before ``{response}`` is the prompt
  (plus ``systemColumn`` and a blank line in front when set), the rest is the completion;
* ``messagesColumn``: chat messages; the last (assistant) message is the completion and the
  tokenizer's chat template renders both;
* hh-rlhf transcripts (``chosen`` only, no template columns): split at the last ``Assistant:``.

Output: ``sft/model`` (standalone; a LoRA is merged into an unquantized base) with its tokenizer,
and ``sft/adapter`` when LoRA is on. Metrics: ``eval_loss`` (and the training loss).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlhf_stages.methods.common import save_trained
from rlhf_stages.runtime import data, models
from rlhf_stages.runtime.context import StageConfigError, StageContext, StageOutcome

if TYPE_CHECKING:
    from datasets import Dataset


def validate(ctx: StageContext) -> None:
    cfg = ctx.config
    data.check_source(ctx, cfg.dataset, "sft.dataset")
    models.check_quantization(cfg.quantization, "sft", cfg.resources.gpus)
    models.check_model_dir(models.locate(ctx, ctx.spec.base_model), "baseModel")
    if ctx.spec.tokenizer is not None:
        models.check_model_dir(models.locate(ctx, ctx.spec.tokenizer), "tokenizer")
    if cfg.messages_column is None:
        data.split_response_template(cfg.prompt_template)


def build_examples(ds: Dataset, cfg: Any) -> Dataset:
    """Rows -> ``prompt``/``completion`` (strings, or message lists for chat data)."""
    if cfg.messages_column is not None:
        data.check_columns(ds, [cfg.messages_column], "sft.messagesColumn")

        def chat(row: dict[str, Any]) -> dict[str, Any]:
            messages = list(row[cfg.messages_column])
            if not messages or messages[-1].get("role") != "assistant":
                raise StageConfigError("sft.messagesColumn: every conversation must end with an assistant message")
            return {"prompt": messages[:-1], "completion": messages[-1:]}

        return ds.map(chat, remove_columns=ds.column_names)

    ds = data.normalise_alpaca(ds)
    prompt_template, prefix = data.split_response_template(cfg.prompt_template)
    needed = [*data.template_fields(prompt_template), "response"]
    hh = "chosen" in ds.column_names and data.is_hh_transcript(ds[0]["chosen"])
    if hh and any(c not in ds.column_names for c in needed):

        def transcript(row: dict[str, Any]) -> dict[str, str]:
            prompt, completion = data.split_hh_transcript(row["chosen"])
            return {"prompt": prompt, "completion": completion}

        return ds.map(transcript, remove_columns=ds.column_names)
    data.check_columns(ds, needed, "sft.promptTemplate")
    if cfg.system_column is not None:
        data.check_columns(ds, [cfg.system_column], "sft.systemColumn")

    def templated(row: dict[str, Any]) -> dict[str, str]:
        prompt = data.render(prompt_template, row)
        system = row.get(cfg.system_column) if cfg.system_column else None
        if system:
            prompt = f"{system}\n\n{prompt}"
        return {"prompt": prompt, "completion": prefix + str(row["response"])}

    return ds.map(templated, remove_columns=ds.column_names)


def run(ctx: StageContext) -> StageOutcome:
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from rlhf_stages.runtime.training import final_metrics, make_trainer, run_trainer, weights_to_save

    cfg, spec, t = ctx.config, ctx.spec, ctx.config.training
    base = models.locate(ctx, spec.base_model)
    tokenizer = models.load_tokenizer(models.locate(ctx, spec.tokenizer) if spec.tokenizer else base)

    rows = data.load_rows(ctx, cfg.dataset, t.seed)
    examples = build_examples(rows, cfg)
    train_ds, eval_ds = data.split_eval(examples, cfg.dataset.eval_fraction, t.seed)

    dtype = models.training_dtype(t.bf16, t.fp16)
    model = models.load_model(base, AutoModelForCausalLM, cfg.quantization, "sft", "float32")
    peft_config = models.lora_config(cfg.lora, "CAUSAL_LM") if cfg.lora.enabled else None

    trainer, callback = make_trainer(
        ctx,
        SFTTrainer,
        SFTConfig,
        t,
        has_eval=eval_ds is not None,
        config={
            "max_length": t.max_length,
            "packing": t.packing,
            "completion_only_loss": cfg.completion_only_loss,
            "eos_token": tokenizer.eos_token,
            "dataset_num_proc": None,
        },
        model=model,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    train_output, resumed_from = run_trainer(ctx, trainer, callback)
    eval_metrics = trainer.evaluate() if eval_ds is not None else None
    metrics = final_metrics(train_output, eval_metrics, ("eval_loss", "eval_mean_token_accuracy"))

    trained, state = weights_to_save(ctx, trainer)  # every rank: collective under FSDP
    if ctx.is_main:
        from transformers import AutoModelForCausalLM

        save_trained(ctx, trained, state, tokenizer, base, dtype, AutoModelForCausalLM)
    return StageOutcome(
        metrics=metrics,
        step=trainer.state.global_step,
        total_steps=trainer.state.max_steps,
        inputs={
            "baseModel": base.label,
            "dataset": data.source_summary(ctx, cfg.dataset),
            "trainRows": len(train_ds),
            "evalRows": len(eval_ds) if eval_ds is not None else 0,
        },
        details={
            "resumedFromStep": resumed_from,
            "lora": cfg.lora.enabled,
            "quantization": cfg.quantization.mode,
            "dtype": dtype,
            "logHistory": callback.history[-50:],
        },
        message=f"SFT done: eval_loss={metrics.get('eval_loss', float('nan')):.4f}",
    )
