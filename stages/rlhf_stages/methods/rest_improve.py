"""ReST's Improve step: fine-tune the policy on the filtered Grow samples (behaviour cloning).

A small loop of our own instead of a Trainer: the same policy object is improved several times per
Grow step and sampled from in between, which a Trainer per Improve step would re-wrap each time.
Loss: mean negative log-likelihood of the completion tokens and the EOS that ends them, given the
prompt (prompt tokens are masked). Optimiser: AdamW over the trainable (LoRA) parameters, fresh per
Improve step (as in the paper, each Improve step is a fine-tuning run on its own filtered set).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

from rlhf_api import TrainingSettings
from rlhf_stages.runtime.checkpoints import STEP_DELAY_ENV
from rlhf_stages.runtime.context import StageContext


@dataclass(frozen=True)
class GrowRow:
    """One scored sample of a Grow step, as kept on the volume."""

    prompt: str
    completion: str
    reward: float
    ended_with_eos: bool
    grow_step: int

    def to_json(self) -> str:
        body = asdict(self)
        body["endedWithEos"] = body.pop("ended_with_eos")
        body["growStep"] = body.pop("grow_step")
        return json.dumps(body, sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> GrowRow:
        body = json.loads(line)
        return cls(
            body["prompt"], body["completion"], float(body["reward"]), bool(body["endedWithEos"]), int(body["growStep"])
        )


def quantile(values: list[float], q: float) -> float:
    """The ``q``-quantile of ``values`` (linear interpolation, like numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return math.inf
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def encode(tokenizer: Any, row: GrowRow, max_length: int) -> tuple[list[int], int] | None:
    """(prompt + completion + EOS ids, prompt length), as generation saw the prompt; None if too long."""
    prompt_ids = list(tokenizer(row.prompt, add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(row.prompt + row.completion, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if len(ids) > max_length or len(ids) <= len(prompt_ids):
        return None
    return ids, len(prompt_ids)


def _batch_loss(model: Any, batch: list[tuple[list[int], int]], pad_id: int) -> Any:
    import torch

    device = next(model.parameters()).device
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, (ids, prompt_len) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        labels[i, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
    out = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), labels=labels.to(device))
    return out.loss


def improve(
    ctx: StageContext, policy: Any, tokenizer: Any, rows: list[GrowRow], t: TrainingSettings, *, seed: int
) -> tuple[float | None, bool]:
    """Fine-tune ``policy`` on ``rows``; returns (mean loss of the last epoch, stopped by SIGTERM)."""
    import torch

    examples = [e for e in (encode(tokenizer, r, t.max_length) for r in rows) if e is not None]
    if not examples:
        return None, False
    rng = random.Random(seed)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    batch_size = t.per_device_train_batch_size * t.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    epochs = max(1, math.ceil(t.num_train_epochs))
    total = min(t.max_steps, steps_per_epoch * epochs) if t.max_steps else steps_per_epoch * epochs
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    delay = float(os.environ.get(STEP_DELAY_ENV, "0") or 0)
    policy.train()
    step, last_losses = 0, list[float]()
    while step < total:
        order = list(range(len(examples)))
        rng.shuffle(order)
        last_losses = []
        for start in range(0, len(order), batch_size):
            if step >= total:
                break
            if ctx.stop_requested.is_set():
                return None, True
            # Linear decay within the Improve step (warm restarts across steps, as each is a fine-tune).
            decay = 1.0 if t.lr_scheduler_type.startswith("constant") else 1 - step / total
            for group in optimizer.param_groups:
                group["lr"] = t.learning_rate * decay
            loss = _batch_loss(policy, [examples[i] for i in order[start : start + batch_size]], pad_id)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            optimizer.step()
            last_losses.append(float(loss.detach()))
            step += 1
            if delay:  # debug knob shared with the Trainer stages (checkpoints.STEP_DELAY_ENV): tests only
                time.sleep(delay)
    policy.eval()
    return (sum(last_losses) / len(last_losses) if last_losses else None), False
