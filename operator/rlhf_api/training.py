"""Knobs shared by every training stage: LoRA, quantization, optimisation."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from .base import ApiModel, Rule


class LoRA(ApiModel):
    """Low-rank adapters (PEFT LoRA). With LoRA on, only the adapter is trained and saved."""

    enabled: bool = True
    """Train a LoRA adapter instead of all weights."""
    r: Annotated[int, Field(ge=1, le=1024)] = 16
    """Adapter rank."""
    alpha: Annotated[int, Field(ge=1, le=4096)] = 32
    """Scaling numerator; the update is scaled by alpha / r."""
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    """Dropout on the adapter input."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases are trained."""
    target_modules: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default_factory=lambda: ["all-linear"], min_length=1, max_length=64
    )
    """Module names (or ``all-linear``) that receive adapters, e.g. ``[q_proj, v_proj]``."""


class Quantization(ApiModel):
    """Loading the frozen base in 8 or 4 bits (bitsandbytes; needs a CUDA GPU). Requires LoRA."""

    mode: Literal["none", "8bit", "4bit"] = "none"
    """``4bit`` with LoRA is QLoRA."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.4 bit per parameter)."""
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Dtype of the matmuls on dequantized weights."""


LRScheduler = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"
]


class TrainingSettings(ApiModel):
    """Optimisation settings, mapped onto transformers/TRL training arguments."""

    rules = (
        Rule(
            cel="!(self.bf16 && self.fp16)",
            message="choose at most one of bf16 and fp16",
            field_path=".fp16",
            check=lambda t: not (t.bf16 and t.fp16),
        ),
    )

    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)] = 2e-4
    """Peak learning rate."""
    num_train_epochs: Annotated[float, Field(gt=0.0, le=1000.0)] = 1.0
    """Passes over the data; ignored when maxSteps is set."""
    max_steps: Annotated[int, Field(ge=1)] | None = None
    """Stop after this many optimizer steps (overrides numTrainEpochs)."""
    per_device_train_batch_size: Annotated[int, Field(ge=1, le=4096)] = 4
    """Sequences per device per forward pass."""
    per_device_eval_batch_size: Annotated[int, Field(ge=1, le=4096)] = 8
    """Sequences per device per evaluation pass."""
    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=4096)] = 1
    """Forward passes per optimizer step."""
    lr_scheduler_type: LRScheduler = "cosine"
    """Learning-rate schedule."""
    warmup_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    """Fraction of steps spent warming up the learning rate."""
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    """AdamW weight decay."""
    max_grad_norm: Annotated[float, Field(gt=0.0)] = 1.0
    """Gradient clipping norm."""
    bf16: bool = False
    """Train in bfloat16 mixed precision (Ampere or newer GPUs)."""
    fp16: bool = False
    """Train in float16 mixed precision."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    max_length: Annotated[int, Field(ge=8, le=131072)] = 1024
    """Maximum tokens per training sequence; longer ones are truncated."""
    packing: bool = False
    """Pack several short examples into one sequence (SFT only)."""
    logging_steps: Annotated[int, Field(ge=1)] = 10
    """Log metrics every N steps."""
    save_steps: Annotated[int, Field(ge=1)] = 500
    """Write a resumable checkpoint every N steps."""
    eval_steps: Annotated[int, Field(ge=1)] | None = None
    """Evaluate every N steps; unset evaluates once at the end."""
    save_total_limit: Annotated[int, Field(ge=1)] = 2
    """Keep at most this many checkpoints on the volume."""
    seed: Annotated[int, Field(ge=0)] = 42
    """Random seed for data order and initialisation."""
