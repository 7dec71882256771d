"""What the alignment methods (DPO, GRPO, RLOO, ReST, RLAIF) share: lineage, pairs, prompts, evaluation.

* Lineage (docs/stage-protocol.md): a policy stage starts from ``sft/model`` when SFT ran, else the
  base model, and trains a fresh LoRA adapter on it; the reference is that model with the adapter
  disabled. The reward model is the stage's ``rewardModel`` or this run's ``reward/model``.
* Preference pairs (DPO, and the reward stage after RLAIF): ``prompt``/``chosen``/``rejected`` with
  the prompt rendered by ``promptTemplate``, or hh-rlhf transcripts split at the last ``Assistant:``.
* Held-out policy evaluation: sample once per held-out prompt (fixed seed) and report EOS rate,
  length and, when a reward model is at hand, its mean score (prompt + completion + EOS, exactly as
  the RL stages are rewarded).

Nothing here imports torch at module level: ``validate`` helpers run before heavy imports.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_api import layout
from rlhf_api.methods import pairs_from
from rlhf_stages.runtime import data, models
from rlhf_stages.runtime.context import StageConfigError, StageContext, StageInputMissing
from rlhf_stages.runtime.outputs import completed_manifest

if TYPE_CHECKING:
    from datasets import Dataset

    from rlhf_api.sources import DatasetSource

EVAL_PROMPTS_MAX = 128
"""Held-out prompts a policy stage evaluates at its end (every method, PPO included): enough for a
stable mean, bounded so the evaluation after SIGTERM's grace-period check stays short."""

# generate() arguments the stages set themselves: from responseLength, temperature, topK and topP,
# and what PPO's math and TRL's online trainers need (one sampled response per prompt, plain
# tensors out, our EOS and pad ids). ``generation.extra`` may set anything else.
RESERVED_GENERATION_KEYS = frozenset(
    {
        "max_new_tokens",
        "max_length",
        "min_length",
        "min_new_tokens",
        "num_return_sequences",
        "do_sample",
        "num_beams",
        "temperature",
        "top_k",
        "top_p",
        "return_dict_in_generate",
        "output_scores",
        "output_logits",
        "eos_token_id",
        "pad_token_id",
        "generation_config",
    }
)


def policy_location(ctx: StageContext) -> models.ModelLocation:
    """``sft/model`` of this run when SFT ran, else ``spec.baseModel``."""
    base = layout.policy_base(ctx.spec, ctx.stage, ctx.invocation.run_dir)
    if base is not None:
        return models.local(ctx, ctx.volume_path(base))
    return models.locate(ctx, ctx.spec.base_model)


def check_policy_input(ctx: StageContext) -> None:
    """Exit 3 when the SFT output this stage builds on is not complete (cheap, before imports)."""
    sft_ran = layout.policy_base(ctx.spec, ctx.stage, ctx.invocation.run_dir) is not None
    if sft_ran and completed_manifest(ctx.stage_output_of("sft")) is None:
        raise StageInputMissing(f"{ctx.stage}: the SFT stage's output is not complete (sft/manifest.json)")
    models.check_model_dir(policy_location(ctx), f"{ctx.stage} policy (sft/model or baseModel)")


def reward_location(ctx: StageContext) -> models.ModelLocation:
    """The stage's ``rewardModel``, else this run's reward stage output."""
    if getattr(ctx.config, "reward_model", None) is not None:
        return models.locate(ctx, ctx.config.reward_model)
    return models.local(ctx, ctx.stage_output_of("reward") / "model")


def check_reward_input(ctx: StageContext) -> None:
    if getattr(ctx.config, "reward_model", None) is None and completed_manifest(ctx.stage_output_of("reward")) is None:
        raise StageInputMissing(f"{ctx.stage}: the reward stage's output is not complete (reward/manifest.json)")
    models.check_model_dir(reward_location(ctx), f"{ctx.stage}.rewardModel (or the reward stage's output)")


def check_preference_set(ctx: StageContext) -> None:
    """A watched stage's held-out preference set (``watch.preferenceSet``) must be there (exit 3)."""
    source = ctx.config.watch.preference_set
    if source is not None:
        data.check_source(ctx, source, f"{ctx.stage}.watch.preferenceSet")


def pairs_source(ctx: StageContext) -> tuple[DatasetSource, str]:
    """The preference pairs a reward or dpo stage trains on, and the template of their prompts.

    Under method RLAIF: the rlaif stage's labelled pairs (prompts already rendered, held out by
    ``rlaif.evalFraction``); otherwise the stage's own ``dataset`` and ``promptTemplate``.
    """
    from rlhf_api.sources import DatasetSource

    if pairs_from(ctx.spec.method) is not None:
        path = layout.rlaif_pairs(ctx.invocation.run_dir)
        fraction = ctx.spec.rlaif.eval_fraction if ctx.spec.rlaif is not None else 0.05
        return DatasetSource(format="jsonl", path=str(path), eval_fraction=fraction), "{prompt}"
    return ctx.config.dataset, ctx.config.prompt_template


def check_pairs_input(ctx: StageContext) -> None:
    """Cheap check that the pairs are there: the rlaif stage's complete output, or the dataset."""
    labeller = pairs_from(ctx.spec.method)
    if labeller is not None:
        if completed_manifest(ctx.stage_output_of(labeller)) is None:
            raise StageInputMissing(
                f"{ctx.stage}: the {labeller} stage's output is not complete ({labeller}/manifest.json)"
            )
        return
    data.check_source(ctx, ctx.config.dataset, f"{ctx.stage}.dataset")


def check_generation_extra(ctx: StageContext) -> None:
    """Exit 2 when ``<stage>.generation.extra`` sets what the stage sets itself."""
    reserved = sorted(RESERVED_GENERATION_KEYS & set(ctx.config.generation.extra))
    if reserved:
        raise StageConfigError(
            f"{ctx.stage}.generation.extra: {reserved} are set by the stage itself "
            "(use responseLength, temperature, topK, topP)"
        )


def check_prompt_template(template: str, what: str) -> None:
    if not data.template_fields(template):
        raise StageConfigError(f"{what}.promptTemplate must read at least one column, e.g. {{prompt}}")


def prompts(ds: Dataset, template: str, what: str) -> Dataset:
    """Rows -> one ``prompt`` column, rendered with ``template``."""
    data.check_columns(ds, data.template_fields(template), f"{what}.promptTemplate")
    return ds.map(lambda row: {"prompt": data.render(template, row)}, remove_columns=ds.column_names)


def preference_pairs(ds: Dataset, template: str, what: str) -> Dataset:
    """Rows -> ``prompt``/``chosen``/``rejected`` strings (``prompt + chosen`` is the scored text)."""
    data.check_columns(ds, ["chosen", "rejected"], f"{what}.dataset")
    fields = data.template_fields(template)
    if all(f in ds.column_names for f in fields) and fields:
        return ds.map(
            lambda row: {"prompt": data.render(template, row), "chosen": row["chosen"], "rejected": row["rejected"]},
            remove_columns=ds.column_names,
        )
    if data.is_hh_transcript(ds[0]["chosen"]):

        def split(row: dict[str, Any]) -> dict[str, str]:
            prompt, chosen = data.split_hh_transcript(row["chosen"])
            rejected_prompt, rejected = data.split_hh_transcript(row["rejected"])
            if rejected_prompt != prompt:  # pairs must share their prompt
                return {"prompt": "", "chosen": "", "rejected": ""}
            return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

        pairs = ds.map(split, remove_columns=ds.column_names)
        return pairs.filter(lambda r: bool(r["prompt"]))
    missing = [f for f in fields if f not in ds.column_names]
    raise StageConfigError(f"{what}.promptTemplate reads {missing}, which the dataset lacks ({ds.column_names})")


def sampling_kwargs(generation: Any) -> dict[str, Any]:
    """Our ``Generation`` section as ``sampling.generate.generate_completions`` arguments."""
    return {"temperature": generation.temperature, "top_k": generation.top_k, "top_p": generation.top_p}


def evaluate_held_out(
    policy: Any,
    tokenizer: Any,
    prompt_texts: list[str],
    *,
    max_new_tokens: int,
    seed: int,
    reward_model: Any | None = None,
    reward_tokenizer: Any | None = None,
) -> dict[str, float]:
    """``eval_*`` metrics of one sample per held-out prompt (deterministic for ``seed``)."""
    from rlhf_stages.sampling.generate import generate_completions
    from rlhf_stages.sampling.score import score_with_reward_model

    unique = list(dict.fromkeys(prompt_texts))[:EVAL_PROMPTS_MAX]
    if not unique:
        return {}
    completions = generate_completions(policy, tokenizer, unique, max_new_tokens, seed)
    n = len(completions)
    metrics = {
        "eval_eos_rate": sum(c.ended_with_eos for c in completions) / n,
        "eval_length_tokens": sum(c.num_tokens for c in completions) / n,
    }
    if reward_model is not None:
        scores = score_with_reward_model(reward_model, reward_tokenizer or tokenizer, unique, completions)
        metrics["eval_reward_mean"] = sum(scores) / n
    return metrics


def save_policy(
    ctx: StageContext,
    model: Any,
    tokenizer: Any,
    base: models.ModelLocation,
    lora: bool,
    under: str = "",
    state_dict: dict[str, Any] | None = None,
) -> Path:
    """``<stage>/adapter`` (LoRA, merged later by the merge stage) or ``<stage>/model`` (all weights);
    ``under`` a subdirectory of the output instead (PPO's ``final/`` beside a selected checkpoint);
    ``state_dict`` the weights to write instead of the model's own (FSDP's gathered ones)."""
    root = ctx.staging_dir / under if under else ctx.staging_dir
    if lora:
        out = root / "adapter"
        model.save_pretrained(str(out), state_dict=state_dict)
        tokenizer.save_pretrained(str(out))
        models.record_adapter_base(out, base.label)
        return out
    out = root / "model"
    models.save_standalone(model, tokenizer, out, state_dict=state_dict)
    return out


def save_trained(
    ctx: StageContext,
    trained: Any,
    state_dict: dict[str, Any] | None,
    tokenizer: Any,
    base: models.ModelLocation,
    dtype: str,
    auto_class: Any,
    **merge_kwargs: Any,
) -> None:
    """A Trainer-trained stage's output (SFT, reward): ``model/`` always (a standalone model the next
    stage and users load without peft), and with LoRA also ``adapter/`` with its base recorded.

    ``auto_class`` and ``merge_kwargs`` load the base again for the merge (a reward model's
    ``num_labels=1`` and ``pad_token_id``). Merge into a freshly loaded unquantized base: merging into
    4/8-bit weights would round the update away (and the model must load without bitsandbytes)."""
    model_dir = ctx.staging_dir / "model"
    if not ctx.config.lora.enabled:
        models.save_standalone(trained, tokenizer, model_dir, dtype, state_dict=state_dict)
        return
    adapter_dir = ctx.staging_dir / "adapter"
    trained.save_pretrained(str(adapter_dir), state_dict=state_dict)
    tokenizer.save_pretrained(str(adapter_dir))
    models.record_adapter_base(adapter_dir, base.label)
    merged = models.merge_adapter(base, adapter_dir, auto_class, dtype, **merge_kwargs)
    if "pad_token_id" in merge_kwargs:  # a sequence classifier finds the last token by it
        merged.config.pad_token_id = merge_kwargs["pad_token_id"]
    models.save_standalone(merged, tokenizer, model_dir)
