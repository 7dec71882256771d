"""Reward-model scoring of prompt + completion, with the EOS rule the reward model was trained under.

One owner for how a policy's answers are scored: held-out evaluation, ReST, PPO (text path) and the
GRPO/RLOO reward function all call :func:`score_with_reward_model`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rlhf_stages.sampling.generate import Completion, device_of


def score_with_reward_model(
    reward_model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    completions: Sequence[str | Completion],
    *,
    ended_with_eos: Sequence[bool] | None = None,
    batch_size: int = 32,
) -> list[float]:
    """Reward-model score of each ``prompt + completion``.

    The EOS token is appended when the completion ended with EOS (as in
    reward-model training data, where every answer is complete).  A
    completion cut off by ``max_new_tokens`` is scored without it, so the
    reward model can tell it is unfinished.  For plain strings the flags come
    from ``ended_with_eos`` and default to True.

    ``reward_model`` is a sequence-classification model with one label.
    Sequences are batched only with others of the same length, so no padding
    is involved and the score is always read at the true last token (even
    when the model's pad id equals its EOS id).
    """
    import torch

    if len(prompts) != len(completions):
        raise ValueError("prompts and completions differ in length")
    if ended_with_eos is not None and len(ended_with_eos) != len(completions):
        raise ValueError("ended_with_eos and completions differ in length")
    eos_id = tokenizer.eos_token_id
    max_len = getattr(reward_model.config, "max_position_embeddings", None)

    sequences: list[list[int]] = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        if isinstance(completion, Completion):
            text, ended = completion.text, completion.ended_with_eos
        else:
            text, ended = completion, True if ended_with_eos is None else ended_with_eos[i]
        ids = list(tokenizer(prompt + text)["input_ids"])
        if ended and eos_id is not None and (not ids or ids[-1] != eos_id):
            ids.append(eos_id)
        if max_len and len(ids) > max_len:
            ids = ids[-max_len:]  # keep the end: that is where the score is read
        sequences.append(ids)

    config = reward_model.config
    pad_id = getattr(config, "pad_token_id", None)
    # If the pad id occurs inside a sequence (pad == eos), HF pooling would
    # skip it; hide the pad id and score one sequence at a time instead.
    pad_collides = pad_id is not None and any(pad_id in s for s in sequences)
    if pad_collides:
        batch_size = 1
    device = device_of(reward_model)
    scores = [0.0] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    groups: list[list[int]] = []
    for i in order:
        if groups and len(sequences[groups[-1][0]]) == len(sequences[i]) and len(groups[-1]) < batch_size:
            groups[-1].append(i)
        else:
            groups.append([i])

    was_training = reward_model.training
    try:
        reward_model.eval()
        if pad_collides:
            config.pad_token_id = None
        with torch.no_grad():
            for group in groups:
                input_ids = torch.tensor([sequences[i] for i in group], device=device)
                logits = reward_model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
                for i, value in zip(group, logits[:, 0].float().tolist(), strict=True):
                    scores[i] = float(value)
    finally:
        if pad_collides:
            config.pad_token_id = pad_id
        reward_model.train(was_training)
    return scores
