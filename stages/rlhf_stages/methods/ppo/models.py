"""The models PPO holds: policy (+ reference), value model and reward model.

Reference: with LoRA the reference is the policy itself with the adapter disabled, so only one copy
of the base weights is in memory; without LoRA it is a frozen copy of the starting policy.

Value model: a separate model initialised from the reward model (backbone and score head), as in
Ouyang et al. (2022) and TRL's former PPOTrainer. Starting from the reward model means the critic
already ranks prefixes sensibly at step 0, which matters on short runs. With LoRA it trains a LoRA
adapter plus the full score head (memory close to the policy's); without LoRA all its weights.
When the reward model cannot be read per token (another tokenizer, or no linear ``score`` head,
e.g. an encoder classifier), the value model starts from the policy's base with a zero head.
"""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf_api import Quantization
from rlhf_stages.methods.ppo.rollout import Rollout, last_token_scores
from rlhf_stages.runtime import models
from rlhf_stages.sampling.score import score_with_reward_model


class TokenScorer(nn.Module):
    """A one-label sequence-classification model read at every position (backbone + linear head)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    @property
    def _hf(self) -> Any:
        model: Any = self.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    @staticmethod
    def supports(model: Any) -> bool:
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        head = getattr(hf, "score", None)
        return (
            getattr(hf.config, "num_labels", None) == 1
            and hasattr(hf, getattr(hf, "base_model_prefix", "") or "-")
            and head is not None
            and any(isinstance(m, nn.Linear) for m in head.modules())
        )

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        hf = self._hf
        backbone = getattr(hf, hf.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return hf.score(hidden.last_hidden_state).squeeze(-1)


class PolicyAndValue(nn.Module):
    """Both trained models in one module, so data-parallel training all-reduces them together."""

    def __init__(self, policy: nn.Module, value: TokenScorer) -> None:
        super().__init__()
        self.policy = policy
        self.value = value

    def forward(self, rollout: Rollout, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        from rlhf_stages.methods.ppo.rollout import token_logprobs, token_values

        logprobs, _ = token_logprobs(self.policy, rollout, temperature)
        return logprobs, token_values(self.value, rollout)


@dataclass
class RewardModel:
    """The frozen reward model and how to score a rollout with it."""

    model: Any
    tokenizer: Any  # the reward model's own tokenizer
    per_token: bool  # same vocabulary as the policy and a linear head: score the generated ids directly

    @torch.no_grad()
    def score(self, rollout: Rollout, policy_tokenizer: Any) -> torch.Tensor:
        """Score of prompt + response, the EOS included when the policy generated it."""
        if self.per_token:
            return last_token_scores(TokenScorer(self.model), rollout)
        # Another tokenizer: go through text, and let the shared evaluation code add its own EOS.
        prompts, texts = [], []
        for q, qm, r, rm in zip(
            rollout.query, rollout.query_mask, rollout.response, rollout.response_mask, strict=True
        ):
            prompts.append(policy_tokenizer.decode(q[qm.bool()], skip_special_tokens=True))
            texts.append(policy_tokenizer.decode(r[rm.bool()], skip_special_tokens=True))
        scores = score_with_reward_model(
            self.model, self.tokenizer, prompts, texts, ended_with_eos=rollout.ended_with_eos.tolist()
        )
        return torch.tensor(scores, device=rollout.query.device)


def _same_vocab(a: Any, b: Any) -> bool:
    return a is b or a.get_vocab() == b.get_vocab()


@dataclass
class PPOModels:
    policy: Any  # PeftModel (LoRA) or the causal LM itself
    reference: Any | None  # None with LoRA: the policy with its adapter disabled
    value: TokenScorer
    reward: RewardModel
    value_from_reward_model: bool

    def reference_context(self) -> AbstractContextManager[Any]:
        """Inside it, ``reference_model()`` computes reference log-probs."""
        return self.policy.disable_adapter() if self.reference is None else nullcontext()

    def reference_model(self) -> Any:
        return self.policy if self.reference is None else self.reference


def load_models(
    policy: models.ModelLocation,
    reward: models.ModelLocation,
    tokenizer: Any,
    stage: Any,
    *,
    device: torch.device,
) -> PPOModels:
    """Policy (+ LoRA), reference, value and reward models, as described in the module docstring."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    quantized = stage.quantization.mode != "none"
    policy_model = models.load_model(policy, AutoModelForCausalLM, stage.quantization, "ppo", "float32")
    reference = None
    if stage.lora.enabled:
        if quantized:
            policy_model = prepare_model_for_kbit_training(policy_model, use_gradient_checkpointing=False)
        policy_model = get_peft_model(policy_model, models.lora_config(stage.lora, "CAUSAL_LM"))
    else:
        reference = copy.deepcopy(policy_model).requires_grad_(False).eval()

    seq_cls = AutoModelForSequenceClassification
    reward_model = models.load_model(reward, seq_cls, Quantization(), "ppo.rewardModel", "float32", num_labels=1)
    reward_model.requires_grad_(False).eval()
    has_own_tokenizer = not Path(reward.id).is_dir() or (Path(reward.id) / "tokenizer_config.json").exists()
    rm_tokenizer = models.load_tokenizer(reward) if has_own_tokenizer else tokenizer
    if reward_model.config.pad_token_id is None:
        reward_model.config.pad_token_id = rm_tokenizer.pad_token_id
    per_token = _same_vocab(tokenizer, rm_tokenizer) and TokenScorer.supports(reward_model)

    if per_token:
        value = models.load_model(reward, seq_cls, Quantization(), "ppo value model", "float32", num_labels=1)
    else:
        value = models.load_model(policy, seq_cls, Quantization(), "ppo value model", "float32", num_labels=1)
        nn.init.zeros_(value.score.weight)
    value.config.pad_token_id = tokenizer.pad_token_id
    if stage.lora.enabled:
        value = get_peft_model(value, models.lora_config(stage.lora, "SEQ_CLS"))  # the score head trains fully
    for m in (reference, reward_model, value) + (() if quantized else (policy_model,)):
        if m is not None:
            m.to(device)
    return PPOModels(
        policy_model, reference, TokenScorer(value), RewardModel(reward_model, rm_tokenizer, per_token), per_token
    )
