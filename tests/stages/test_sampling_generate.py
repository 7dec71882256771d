"""Where answers end: one rule (``sampling.generate.eos_ids``) for sampling, PPO and the GRPO/RLOO reward."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rlhf_stages.methods.policy_rl import RewardModelReward
from rlhf_stages.sampling.generate import eos_ids


def _policy(generation_eos: int | list[int] | None) -> SimpleNamespace:
    return SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=generation_eos))


def test_eos_ids_join_the_tokenizer_and_the_generation_config() -> None:
    tokenizer = SimpleNamespace(eos_token_id=2)
    assert eos_ids(_policy([7, 2]), tokenizer) == [2, 7]
    assert eos_ids(_policy(9), tokenizer) == [2, 9]
    assert eos_ids(_policy(None), tokenizer) == [2]
    assert eos_ids(SimpleNamespace(), tokenizer) == [2]  # a model without a generation_config


def test_eos_ids_refuse_a_model_whose_answers_could_never_end() -> None:
    with pytest.raises(ValueError, match="no EOS token"):
        eos_ids(_policy(None), SimpleNamespace(eos_token_id=None))


def test_grpo_rloo_reward_honours_the_policy_generation_config() -> None:
    """TRL stops sampling at generation_config's EOS ids too: such an answer is finished, not cut off
    (before, only the tokenizer's EOS counted, so it was scored without EOS and penalised)."""
    tokenizer = SimpleNamespace(eos_token_id=2)
    reward = RewardModelReward.for_policy(_policy([2, 7]), tokenizer, None, tokenizer, missing_eos_penalty=1.0)
    assert reward.ended([[5, 6, 7], [5, 6, 2], [5, 6, 8], []]) == [True, True, False, False]
