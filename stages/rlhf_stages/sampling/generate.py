"""Sampling from a causal LM: one completion per prompt, deterministic for a seed, and where answers end.

Generic over models and tasks: the RL stages (held-out evaluation, ReST, RLAIF), PPO's rollout and
the tiny task's evaluation CLI (``rlhf_stages.tiny.evaluate``) all sample through here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # heavy imports only for type checkers
    import torch


@dataclass(frozen=True)
class Completion:
    prompt: str
    text: str  # decoded answer, EOS excluded (starts with the separator space)
    ended_with_eos: bool
    num_tokens: int  # generated tokens, EOS included
    token_ids: tuple[int, ...] = ()  # the generated ids, EOS included (the watch measures them)


def device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token id that ends an answer: the tokenizer's EOS and the model's ``generation_config`` ones.

    One owner for the rule, so sampling, PPO's rollout and the GRPO/RLOO reward agree on when an
    answer is finished (a chat model may end a turn with a token other than the tokenizer's EOS).
    """
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        ids.update(int(i) for i in gen_eos)
    if not ids:
        raise ValueError("the tokenizer has no EOS token: responses could never end")
    return sorted(ids)


def generate_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    seed: int = 0,
    *,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int = 32,
) -> list[Completion]:
    """Sample one completion per prompt, deterministically for ``seed``.

    Defaults sample from the unmodified distribution (temperature 1, no top-k
    or top-p), which is what RL trains; ``greedy=True`` decodes greedily.  The
    global torch RNG is left untouched.
    """
    import torch
    from transformers import GenerationConfig

    if not prompts:
        return []
    device = device_of(model)
    ends = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0]
    gen_kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": not greedy,
        "eos_token_id": ends,
        "pad_token_id": pad_id,
    }
    if not greedy:
        gen_kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
    gen_config = GenerationConfig(**gen_kwargs)

    results: list[Completion] = []
    was_training = model.training
    old_side = tokenizer.padding_side
    # Left padding: generation continues from the true end of each prompt.
    tokenizer.padding_side = "left"
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        model.eval()
        with torch.random.fork_rng(devices=cuda_devices), torch.no_grad():
            torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                batch = list(prompts[start : start + batch_size])
                enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                out = model.generate(**enc, generation_config=gen_config)
                new_tokens = out[:, enc["input_ids"].shape[1] :].tolist()
                for prompt, ids in zip(batch, new_tokens, strict=True):
                    cut = next((i for i, t in enumerate(ids) if t in ends), None)
                    answer = ids if cut is None else ids[:cut]
                    results.append(
                        Completion(
                            prompt=prompt,
                            text=tokenizer.decode(answer, skip_special_tokens=True),
                            ended_with_eos=cut is not None,
                            num_tokens=len(answer) + (cut is not None),
                            token_ids=tuple(ids if cut is None else ids[: cut + 1]),
                        )
                    )
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return results


def load_policy(path: Path, device: str = "cpu") -> Any:
    """A causal LM from a full checkpoint or a PEFT adapter directory."""
    model: Any
    if (path / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(str(path))
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path))
    return model.to(device)
