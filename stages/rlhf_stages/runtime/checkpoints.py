"""Resumable checkpoints, SIGTERM and progress for HF-Trainer-based stages.

The Trainer writes each checkpoint into ``<stage>.checkpoints/.incoming/checkpoint-<step>``;
once it is complete (``on_save`` runs after model, optimizer, scheduler, RNG and trainer state
are written) rank 0 renames it to ``<stage>.checkpoints/checkpoint-<step>``. So a directory
named ``checkpoint-<step>`` is always complete, and a kill mid-save leaves only ``.incoming``
debris that the next attempt deletes.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from rlhf_stages.runtime.context import StageContext

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
INCOMING = ".incoming"
# Debug knob: sleep this long after every optimizer step, to make a tiny run slow enough to be
# interrupted in tests. Never set in production.
STEP_DELAY_ENV = "RLHF_DEBUG_STEP_DELAY_S"


def complete_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(directory: Path) -> tuple[int, Path] | None:
    found = complete_checkpoints(directory)
    return found[-1] if found else None


def incoming_dir(ctx: StageContext) -> Path:
    """Where the Trainer writes (its ``output_dir``)."""
    return ctx.checkpoints_dir / INCOMING


def clear_incoming(ctx: StageContext) -> None:
    """Drop partial checkpoints a killed attempt left behind (rank 0, before training)."""
    if ctx.is_main:
        shutil.rmtree(incoming_dir(ctx), ignore_errors=True)
        incoming_dir(ctx).mkdir(parents=True, exist_ok=True)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _any_rank(flag: bool) -> bool:
    """True when the flag is set on any rank, so every rank stops at the same step."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


class StageCallback(TrainerCallback):
    """Commits checkpoints, stops on SIGTERM after saving one, and writes progress."""

    def __init__(self, ctx: StageContext, keep: int) -> None:
        self.ctx = ctx
        self.keep = keep
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
        if _any_rank(self.ctx.stop_requested.is_set()):
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
        name = f"checkpoint-{state.global_step}"
        if self.ctx.is_main:
            source = Path(str(args.output_dir)) / name
            target = self.ctx.checkpoints_dir / name
            if target.exists():  # the same step saved twice (e.g. a SIGTERM right after a save)
                shutil.rmtree(target)
            os.rename(source, target)
            for _, old in complete_checkpoints(self.ctx.checkpoints_dir)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.last_checkpoint = name
        _barrier()
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        self.ctx.write_progress(state.global_step, state.max_steps, self.latest_logs, force=True)
