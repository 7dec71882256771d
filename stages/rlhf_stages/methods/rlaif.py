"""RLAIF stage: a judge model labels pairs of the SFT policy's answers under a written constitution.

1. **Sample**: for every prompt of ``rlaif.dataset`` the policy (``sft/model``, else ``baseModel``)
   samples ``2 * pairsPerPrompt`` answers (``generation``, ``responseLength``); consecutive answers
   form a pair. Pairs with an unfinished answer (cut off at ``responseLength.max`` without EOS) or
   two identical answers are dropped: an unfinished answer is not a preference to learn from, and
   the next stage appends EOS to every answer it trains on.
2. **Judge** (``rlhf_stages.methods.judge``): the judge reads ``judgeTemplate`` filled with the constitution,
   the prompt and the two answers, and its next-token log-probabilities of `` A`` and `` B`` give
   ``P(A)``. With ``bothOrders`` each pair is asked twice, A/B swapped; the preference is the mean of
   the two and the pair is kept only when both orders name the same winner.
3. **Write** ``rlaif/pairs.jsonl`` (prompt, chosen, rejected, preference = P(chosen better)), which the
   reward stage (then PPO) or the dpo stage trains on, and ``rlaif/verdicts.jsonl`` (every judged pair
   with both probabilities and whether it was kept) for inspection.

Checkpoints: the sampled answers, then the verdicts in chunks of ``JUDGE_CHUNK`` pairs, each written
complete (temporary name, then rename); a preempted stage resumes with the samples and chunks it has.

Metrics: ``pairs_labelled``, ``pairs_judged``, ``agreement_rate`` (both orders agree),
``first_position_rate`` (share of verdicts for the answer shown first: 0.5 is unbiased),
``judge_confidence`` (mean ``|2 P - 1|``), ``dropped_unfinished``, ``dropped_identical``,
``sample_eos_rate``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rlhf_api import layout
from rlhf_stages.methods import common, judge
from rlhf_stages.runtime import data, models
from rlhf_stages.runtime.atomic import write_json_atomic, write_jsonl_atomic
from rlhf_stages.runtime.context import (
    StageConfigError,
    StageContext,
    StageInputMissing,
    StageInterrupted,
    StageOutcome,
)

GENERATION_BATCH = 64
JUDGE_CHUNK = 256
JUDGE_BATCH = 16


def constitution_file() -> Path:
    """Where a constitution ConfigMap is mounted (``$RLHF_CONSTITUTION_FILE`` outside a cluster)."""
    override = os.environ.get(layout.CONSTITUTION_FILE_ENV)
    return Path(override) if override else Path(layout.CONSTITUTION_MOUNT_PATH) / layout.CONSTITUTION_KEY


def principles(ctx: StageContext) -> list[str]:
    cfg = ctx.config
    if cfg.constitution is not None:
        return list(cfg.constitution)
    path = constitution_file()
    if not path.is_file():
        raise StageInputMissing(
            f"rlaif.constitutionConfigMap: {path} is not there; the operator mounts ConfigMap "
            f"{cfg.constitution_config_map!r} (key {layout.CONSTITUTION_KEY!r}) there. Outside a cluster set "
            f"{layout.CONSTITUTION_FILE_ENV} to a file with one principle per line, or use rlaif.constitution"
        )
    found = judge.parse_constitution(path.read_text(encoding="utf-8"))
    if not found:
        raise StageConfigError(f"rlaif.constitutionConfigMap: {path} holds no principle (one per line)")
    return found


def judge_location(ctx: StageContext) -> models.ModelLocation:
    return models.locate(ctx, ctx.config.judge)


def validate(ctx: StageContext) -> None:
    cfg = ctx.config
    data.check_source(ctx, cfg.dataset, "rlaif.dataset")
    common.check_prompt_template(cfg.prompt_template, "rlaif")
    missing = judge.missing_template_fields(cfg.judge_template)
    if missing:
        raise StageConfigError(f"rlaif.judgeTemplate lacks {', '.join('{' + m + '}' for m in missing)}")
    common.check_policy_input(ctx)
    models.check_model_dir(judge_location(ctx), "rlaif.judge")
    principles(ctx)
    if cfg.resources.gpus > 1:  # sampling and judging run in one process
        raise StageConfigError("rlaif.resources.gpus: the labelling stage runs in one process; use at most 1 GPU")
    if cfg.generation.extra:
        raise StageConfigError("rlaif.generation.extra: not supported by the sampler (use temperature/topK/topP)")


def sample_pairs(ctx: StageContext, prompts: list[str]) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Sample answers from the policy and pair them; drop unfinished and identical pairs."""
    from transformers import AutoModelForCausalLM

    from rlhf_stages.sampling.generate import generate_completions

    cfg = ctx.config
    base = common.policy_location(ctx)
    tokenizer = models.load_tokenizer(base)
    policy = models.load_model(base, AutoModelForCausalLM, models.Quantization(), "rlaif policy", "float32").eval()
    per_prompt = 2 * cfg.pairs_per_prompt
    repeated = [p for p in prompts for _ in range(per_prompt)]
    completions = generate_completions(
        policy,
        tokenizer,
        repeated,
        cfg.response_length.max,
        seed=cfg.seed,
        batch_size=GENERATION_BATCH,
        **common.sampling_kwargs(cfg.generation),
    )
    pairs, unfinished, identical = [], 0, 0
    for i in range(0, len(completions), 2):
        x, y = completions[i], completions[i + 1]
        if not (x.ended_with_eos and y.ended_with_eos):
            unfinished += 1
        elif x.text.strip() == y.text.strip():
            identical += 1
        else:
            pairs.append({"prompt": x.prompt, "x": x.text, "y": y.text})
    stats = {
        "sample_eos_rate": sum(c.ended_with_eos for c in completions) / max(1, len(completions)),
        "dropped_unfinished": float(unfinished),
        "dropped_identical": float(identical),
    }
    return pairs, stats


def judge_chunk(
    judge_model: Any, judge_tokenizer: Any, cfg: Any, rules: list[str], pairs: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Verdicts on ``pairs``: P(x wins) with x shown first, and (bothOrders) with x shown second."""
    first = [judge.render_judge_prompt(cfg.judge_template, rules, p["prompt"], p["x"], p["y"]) for p in pairs]
    scores = judge.choice_log_probs(judge_model, judge_tokenizer, first, batch_size=JUDGE_BATCH)
    swapped_scores: list[list[float]] | None = None
    if cfg.both_orders:
        swapped = [judge.render_judge_prompt(cfg.judge_template, rules, p["prompt"], p["y"], p["x"]) for p in pairs]
        swapped_scores = judge.choice_log_probs(judge_model, judge_tokenizer, swapped, batch_size=JUDGE_BATCH)
    out = []
    for i, pair in enumerate(pairs):
        p_first = judge.probability_first(*scores[i])
        p_second = None if swapped_scores is None else 1.0 - judge.probability_first(*swapped_scores[i])
        out.append(pair | {"p_x_shown_first": p_first, "p_x_shown_second": p_second})
    return out


def _verdict(row: dict[str, Any]) -> judge.Verdict:
    return judge.Verdict(row["p_x_shown_first"], row["p_x_shown_second"])


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def run(ctx: StageContext) -> StageOutcome:
    from transformers import AutoModelForCausalLM

    cfg = ctx.config
    rules = principles(ctx)
    rows = data.load_rows(ctx, cfg.dataset, cfg.seed)
    prompts = list(common.prompts(rows, cfg.prompt_template, "rlaif")["prompt"])
    ctx.checkpoints_dir.mkdir(parents=True, exist_ok=True)

    samples_file = ctx.checkpoints_dir / "samples.json"
    if samples_file.exists():  # sampled before a restart: judge exactly those
        saved = json.loads(samples_file.read_text(encoding="utf-8"))
        pairs, stats = saved["pairs"], saved["stats"]
    else:
        pairs, stats = sample_pairs(ctx, prompts)
        write_json_atomic(samples_file, {"pairs": pairs, "stats": stats})
    if not pairs:
        raise StageConfigError("rlaif: no pair of finished, different answers to judge (raise responseLength.max?)")

    judge_at = judge_location(ctx)
    judge_tokenizer = models.load_tokenizer(judge_at)
    judge_model = models.load_model(
        judge_at, AutoModelForCausalLM, models.Quantization(), "rlaif.judge", cfg.judge_dtype
    ).eval()
    chunks = [pairs[i : i + JUDGE_CHUNK] for i in range(0, len(pairs), JUDGE_CHUNK)]
    judged: list[dict[str, Any]] = []
    for k, chunk in enumerate(chunks):
        chunk_file = ctx.checkpoints_dir / f"verdicts-{k}.jsonl"
        if not chunk_file.exists():
            if ctx.stop_requested.is_set():
                raise StageInterrupted(k, "samples and judged chunks" if k else "samples")
            write_jsonl_atomic(chunk_file, judge_chunk(judge_model, judge_tokenizer, cfg, rules, chunk))
        judged.extend(_read_jsonl(chunk_file))
        ctx.write_progress(k + 1, len(chunks), force=True)

    verdicts = [_verdict(r) for r in judged]
    labelled = []
    for row, verdict in zip(judged, verdicts, strict=True):
        row["kept"] = verdict.agreed
        if verdict.agreed:
            chosen, rejected = (row["x"], row["y"]) if verdict.x_wins else (row["y"], row["x"])
            preference = verdict.preference_x if verdict.x_wins else 1.0 - verdict.preference_x
            labelled.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected, "preference": preference})
    if not labelled:
        raise StageConfigError("rlaif: the judge's two orders never agreed; no pair is usable (check rlaif.judge)")
    metrics = {"pairs_labelled": float(len(labelled)), "pairs_judged": float(len(judged))}
    metrics |= judge.summarise(verdicts) | stats
    if ctx.is_main:
        write_jsonl_atomic(ctx.staging_dir / layout.RLAIF_PAIRS_FILE, labelled)
        write_jsonl_atomic(ctx.staging_dir / "verdicts.jsonl", judged)
    return StageOutcome(
        metrics=metrics,
        step=len(chunks),
        total_steps=len(chunks),
        inputs={
            "policy": common.policy_location(ctx).label,
            "judge": judge_at.label,
            "dataset": data.source_summary(ctx, cfg.dataset),
            "prompts": len(prompts),
        },
        details={"constitution": rules, "bothOrders": cfg.both_orders, "pairsFile": layout.RLAIF_PAIRS_FILE},
        message=f"RLAIF labelled {len(labelled)} of {len(judged)} pairs "
        f"(agreement {metrics.get('agreement_rate', 1.0):.2f}, first-position rate "
        f"{metrics.get('first_position_rate', float('nan')):.2f})",
    )
