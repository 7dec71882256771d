"""What every Trainer-based stage shares: TrainingSettings -> TRL config kwargs, W&B, resume, stop.

Usage in a stage (see sft.py)::

    trainer, callback = make_trainer(ctx, SFTTrainer, SFTConfig, settings, has_eval=..., config={"max_length": ...},
                                     model=model, train_dataset=train_ds, ...)
    train_out, resumed_from = run_trainer(ctx, trainer, callback)   # resumes; StageInterrupted on SIGTERM
"""

from __future__ import annotations

import os
from typing import Any

from rlhf_api import TrainingSettings
from rlhf_api.methods import STAGE_KINDS
from rlhf_stages.runtime.checkpoints import StageCallback, trainer_checkpoints
from rlhf_stages.runtime.context import StageConfigError, StageContext, StageInterrupted
from rlhf_stages.runtime.launch import sharding


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def report_to(ctx: StageContext) -> list[str]:
    """W&B only when the spec asks for it; its settings travel as the env vars wandb reads."""
    wandb = ctx.spec.wandb
    if wandb is None:
        return ["none"]
    os.environ["WANDB_PROJECT"] = wandb.project
    os.environ["WANDB_MODE"] = wandb.mode
    if wandb.entity:
        os.environ["WANDB_ENTITY"] = wandb.entity
    # Offline runs land on the volume, next to the stage, for a later `wandb sync`.
    os.environ.setdefault("WANDB_DIR", str(ctx.run_dir))
    os.environ.setdefault("WANDB_RUN_GROUP", f"{ctx.invocation.run.namespace}/{ctx.invocation.run.name}")
    return ["wandb"]


def checkpointing_field() -> str:
    """transformers 5 renamed gradient_checkpointing to activation_checkpointing (old name deprecated);
    TRL still defaults the old one to True, so the new one must be set to win."""
    from transformers import TrainingArguments

    names = TrainingArguments.__dataclass_fields__
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def trainer_kwargs(ctx: StageContext, t: TrainingSettings, *, has_eval: bool) -> dict[str, Any]:
    """Keyword arguments for any TRL ``*Config`` (a TrainingArguments subclass).

    Everything TRL defaults differently from our API (bf16, gradient checkpointing) is passed
    explicitly, so a CPU run is a CPU run and the spec means what it says.
    """
    evaluate_periodically = has_eval and t.eval_steps is not None
    return {
        "output_dir": str(trainer_checkpoints(ctx).incoming),
        "learning_rate": t.learning_rate,
        "num_train_epochs": t.num_train_epochs,
        "max_steps": t.max_steps if t.max_steps is not None else -1,
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "per_device_eval_batch_size": t.per_device_eval_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "lr_scheduler_type": t.lr_scheduler_type,
        "warmup_steps": t.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "bf16": t.bf16,
        "fp16": t.fp16,
        checkpointing_field(): t.gradient_checkpointing,
        "logging_steps": t.logging_steps,
        "save_strategy": "steps",
        "save_steps": t.save_steps,
        # Rotation is ours (StageCallback), over committed checkpoints only.
        "save_total_limit": None,
        "eval_strategy": "steps" if evaluate_periodically else "no",
        "eval_steps": t.eval_steps if evaluate_periodically else None,
        "seed": t.seed,
        "data_seed": t.seed,
        "use_cpu": not cuda_available(),
        "report_to": report_to(ctx),
        "run_name": f"{ctx.invocation.run.name}-{ctx.stage}",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "remove_unused_columns": True,
        # Every parameter that trains is used in every forward pass; the search costs a graph walk.
        "ddp_find_unused_parameters": False,
    }


def check_fsdp_placement(ctx: StageContext) -> None:
    """Refuse ``sharding: FSDP`` where it cannot shard: a stage that does not train through the
    Trainer, or a Pod without a CUDA device. Called by the entrypoint before it starts torchrun, so
    the refusal is one exit 2 naming the field rather than one per launched process."""
    where = f"spec.{ctx.stage}.resources.sharding"
    if "FSDP" not in STAGE_KINDS[ctx.stage].shardings:  # the method table's word (admission refuses it too)
        raise StageConfigError(f"{where}: {ctx.stage} does not train with FSDP; use DDP")
    if not cuda_available():
        raise StageConfigError(
            f"{where}: FSDP needs GPUs, and this Pod has no CUDA device (resources.gpus is "
            f"{ctx.config.resources.gpus}); give the stage GPUs, or use sharding: DDP"
        )


def fsdp_kwargs(ctx: StageContext, model: Any, t: TrainingSettings) -> dict[str, Any]:
    """``resources.sharding: FSDP`` as Trainer arguments (accelerate does the wrapping).

    * full shard (ZeRO-3-like): FSDP2 with ``reshard_after_forward``, so parameters, gradients and
      optimiser state are split over every rank of every node and gathered one layer at a time;
    * auto wrap by transformer layer: the classes the model itself names as never to be split
      (``_no_split_modules``, e.g. ``LlamaDecoderLayer``), one FSDP unit each;
    * the full state dict, gathered to rank 0, for checkpoints and the output (``state_dict_type``),
      so a checkpoint resumes on any number of ranks and the merge stage reads plain weights;
    * gradient checkpointing as FSDP's own activation checkpointing: the Trainer's would all-gather
      every layer a second time in the backward pass.

    Only on GPUs: the API refuses FSDP without GPUs, with quantization and on stages that do not
    train through the Trainer. A Pod that asked for GPUs but sees none is refused here (exit 2): on
    the CPU the Trainer would quietly train with DDP instead (transformers 5.23 ignores ``fsdp`` with
    ``use_cpu``; torch's own FSDP2 runs on gloo, but the Trainer does not offer it).
    """
    check_fsdp_placement(ctx)
    layers = sorted(set(getattr(model, "_no_split_modules", None) or ()))
    if not layers:
        raise StageConfigError(
            f"spec.{ctx.stage}.resources.sharding: FSDP wraps each transformer layer, but "
            f"{type(model).__name__} names no layer class (_no_split_modules); use sharding: DDP"
        )
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "reshard_after_forward": True,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": layers,
            "state_dict_type": "FULL_STATE_DICT",
            "activation_checkpointing": t.gradient_checkpointing,
        },
        checkpointing_field(): False,
    }


def make_trainer(
    ctx: StageContext,
    trainer_class: Any,
    config_class: Any,
    settings: TrainingSettings,
    *,
    has_eval: bool,
    config: dict[str, Any],
    **trainer_args: Any,
) -> tuple[Any, StageCallback]:
    """The one recipe of every Trainer-based stage (SFT, reward, DPO, GRPO, RLOO): a TRL ``*Config``
    from ``settings`` (:func:`trainer_kwargs`) plus the stage's own ``config`` fields, and the trainer
    with our :class:`StageCallback` (commit, rotate, SIGTERM, progress). Train it with :func:`run_trainer`."""
    callback = StageCallback(ctx, keep=settings.save_total_limit)
    kwargs = trainer_kwargs(ctx, settings, has_eval=has_eval)
    if sharding(ctx) == "FSDP":
        kwargs.update(fsdp_kwargs(ctx, trainer_args["model"], settings))
    args = config_class(**kwargs, **config)
    return trainer_class(args=args, callbacks=[callback], **trainer_args), callback


def run_trainer(ctx: StageContext, trainer: Any, callback: StageCallback) -> tuple[Any, int | None]:
    """Train, resuming from the newest complete checkpoint. Returns (TrainOutput, resumed step)."""
    if ctx.stop_requested.is_set():
        raise StageInterrupted(0, None)
    resume = callback.checkpoints.latest()
    if ctx.is_main:
        callback.checkpoints.clear_incoming()
    if resume is not None:
        print(f"rlhf-stage: resuming {ctx.stage} from {resume[1].name}", flush=True)
    output = trainer.train(resume_from_checkpoint=str(resume[1]) if resume else None)
    if callback.stopped_by_signal:
        raise StageInterrupted(trainer.state.global_step, callback.last_checkpoint)
    return output, resume[0] if resume else None


def weights_to_save(ctx: StageContext, trainer: Any) -> tuple[Any, dict[str, Any] | None]:
    """The trained model to save and, under FSDP, its full state dict (``save_pretrained(state_dict=)``).

    Every rank must call it: under FSDP gathering the shards is collective (the state lands on rank 0,
    which alone saves). Under DDP every rank holds the whole model: (the model, None).
    """
    if sharding(ctx) != "FSDP":
        return trainer.model, None
    state = trainer.accelerator.get_state_dict(trainer.model)
    return trainer.accelerator.unwrap_model(trainer.model), state


def final_metrics(train_output: Any, eval_metrics: dict[str, float] | None, keys: tuple[str, ...]) -> dict[str, float]:
    """A few headline numbers: train loss and the chosen eval metrics that exist."""
    metrics: dict[str, float] = {}
    loss = getattr(train_output, "training_loss", None)
    if loss is not None:
        metrics["train_loss"] = float(loss)
    for key in keys:
        if eval_metrics and key in eval_metrics:
            metrics[key] = float(eval_metrics[key])
    return metrics
