"""Resumable checkpoints, SIGTERM and progress for HF-Trainer-based stages.

The Trainer writes each checkpoint into ``<stage>.checkpoints/.incoming/checkpoint-<step>`` (its
``output_dir`` is the checkpoint directory's ``incoming``); once it is complete (``on_save`` runs
after model, optimizer, scheduler, RNG and trainer state are written) rank 0 publishes it as
``<stage>.checkpoints/checkpoint-<step>``: the protocol of ``checkpoint_dir``, shared with PPO and ReST.
"""

from __future__ import annotations

import os
import time
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from rlhf_stages.runtime.checkpoint_dir import CheckpointDir
from rlhf_stages.runtime.context import StageContext

# Debug knob: sleep this long after every optimizer step, to make a tiny run slow enough to be
# interrupted in tests. Never set in production.
STEP_DELAY_ENV = "RLHF_DEBUG_STEP_DELAY_S"


def trainer_checkpoints(ctx: StageContext, keep: int = 2) -> CheckpointDir:
    """The stage's checkpoint directory as a Trainer-based stage uses it (``keep``: save_total_limit)."""
    return CheckpointDir(ctx.checkpoints_dir, keep=keep)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rank_max(value: float) -> float:
    """The largest ``value`` over all ranks (every rank must call it): what one rank decided, known to all."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([float(value)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def ranks_agree(value: float) -> bool:
    """Whether every rank holds the same ``value`` (every rank must call it)."""
    return rank_max(value) == -rank_max(-value)


def any_rank(flag: bool) -> bool:
    """True when the flag is set on any rank, so every rank stops at the same step."""
    return rank_max(1.0 if flag else 0.0) > 0


class StageCallback(TrainerCallback):
    """Commits checkpoints, stops on SIGTERM after saving one, and writes progress."""

    def __init__(self, ctx: StageContext, keep: int) -> None:
        self.ctx = ctx
        self.checkpoints = trainer_checkpoints(ctx, keep)
        self.stopped_by_signal = False
        self.last_checkpoint: str | None = None
        self.latest_logs: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []
        self._delay = float(os.environ.get(STEP_DELAY_ENV, "0") or 0)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        self.ctx.write_progress(state.global_step, state.max_steps, force=True)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        if self._delay:
            time.sleep(self._delay)
        if any_rank(self.ctx.stop_requested.is_set()):
            # Save now, then leave the training loop; run_trainer turns this into exit 143.
            self.stopped_by_signal = True
            control.should_save = True
            control.should_training_stop = True
        self.ctx.write_progress(state.global_step, state.max_steps, self.latest_logs)
        return control

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kw: Any):
        numbers = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, int | float)}
        self.latest_logs.update(numbers)
        self.history.append({"step": state.global_step, **numbers})
        self.ctx.write_progress(state.global_step, state.max_steps, self.latest_logs, force=True)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        _barrier()  # every rank has written its RNG state into the checkpoint
        if self.ctx.is_main:
            self.checkpoints.publish(state.global_step)
        self.last_checkpoint = f"checkpoint-{state.global_step}"
        _barrier()
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        self.ctx.write_progress(state.global_step, state.max_steps, self.latest_logs, force=True)
