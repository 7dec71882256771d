"""PPO's side of ``sampling.watch``: how the policy answers the held-out prompts and how the answers are scored.

Every evaluation samples with the same seed and the full response budget (``responseLength.max``, so
the length is the policy's choice, not the budget's), scores with the reward model PPO optimises
(raw, no EOS penalty: comparable with the reward model's training range) and measures the KL to the
reference as PPO does. The RNG state of the training loop is put back afterwards, so evaluating
changes nothing about training (a run with evaluations trains the same weights as one without).

Rank 0 only: nothing here communicates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rlhf_stages.methods.ppo import checkpoint as ckpt
from rlhf_stages.methods.ppo.rollout import token_logprobs
from rlhf_stages.runtime.models import load_trainable_state, trainable_state
from rlhf_stages.sampling.watch import EVAL_SEED, Answers


@torch.no_grad()
def answers(trainer: Any, prompts: Sequence[Sequence[int]]) -> Answers:
    st, gen = trainer.stage, trainer.stage.generation
    saved = ckpt.rng_state(trainer.generators)
    torch.manual_seed(EVAL_SEED)
    tokens: list[list[int]] = []
    ended: list[bool] = []
    scores: list[float] = []
    kls: list[float] = []
    texts: list[str] = []
    shown: list[str] = []
    policy = trainer.module.policy
    try:
        for start in range(0, len(prompts), trainer.local_batch):
            chunk = prompts[start : start + trainer.local_batch]
            batch = trainer.sample(policy, chunk, [st.response_length.max] * len(chunk))
            logprobs, _ = token_logprobs(policy, batch, gen.temperature)
            with trainer.models.reference_context():
                ref_logprobs, _ = token_logprobs(trainer.models.reference_model(), batch, gen.temperature)
            kls += ((logprobs - ref_logprobs) * batch.response_mask).sum(1).tolist()
            scores += trainer.models.reward.score(batch, trainer.tokenizer).tolist()
            for q, qm, r, rm, eos in zip(
                batch.query, batch.query_mask, batch.response, batch.response_mask, batch.ended_with_eos, strict=True
            ):
                ids = r[rm.bool()].tolist()
                if eos:
                    ids = ids[:-1]  # the answer, without its EOS
                tokens.append(ids)
                ended.append(bool(eos))
                texts.append(trainer.tokenizer.decode(ids, skip_special_tokens=True))
                shown.append(trainer.tokenizer.decode(q[qm.bool()], skip_special_tokens=True))
    finally:
        ckpt.restore_rng(saved, trainer.generators)
    return Answers(tokens=tokens, ended_with_eos=ended, scores=scores, kl=kls, texts=texts, prompts=shown)


def policy_weights(trainer: Any) -> dict[str, torch.Tensor]:
    """The policy's trainable weights (the adapter, or all weights), as a checkpoint keeps them."""
    return trainable_state(trainer.module.policy)


def load_policy_weights(trainer: Any, state: dict[str, torch.Tensor]) -> None:
    load_trainable_state(trainer.module.policy, state)
