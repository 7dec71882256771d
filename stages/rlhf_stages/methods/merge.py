"""Merge stage: the run's output model, standalone, in ``merge.dtype`` (``merge/model`` + tokenizer).

Lineage (docs/stage-protocol.md): the last enabled policy stage before merge
(``layout.last_policy_stage``) left either an adapter (``<stage>/adapter``), which is folded into
the model it was trained on (``layout.policy_base``: ``sft/model`` when SFT ran, else the base
model), or full weights (``<stage>/model``), which are converted. When SFT is that stage its
``sft/model`` is already merged, and with no policy stage at all the base model is converted:
"no adapter" is a copy in the configured dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rlhf_api import layout
from rlhf_stages.runtime import models
from rlhf_stages.runtime.context import StageContext, StageInputMissing, StageOutcome
from rlhf_stages.runtime.outputs import completed_manifest


@dataclass(frozen=True)
class MergePlan:
    model: models.ModelLocation
    """The full model: the adapter's base, or the model to convert."""
    adapter: Path | None
    """The adapter to fold in, if any."""
    source_stage: str | None
    """The policy stage whose result this is (None: the base model)."""


def plan(ctx: StageContext) -> MergePlan:
    spec, run = ctx.spec, ctx.invocation.run_dir
    last = layout.last_policy_stage(spec)
    if last is None:
        return MergePlan(models.locate(ctx, spec.base_model), None, None)
    out = ctx.stage_output_of(last)
    if completed_manifest(out) is None:
        raise StageInputMissing(f"merge: the {last} stage's output {ctx.relative(out)} is not complete")
    if (out / "adapter").is_dir() and last != "sft":
        base = layout.policy_base(spec, last, run)
        location = models.local(ctx, ctx.workspace / base) if base else models.locate(ctx, spec.base_model)
        return MergePlan(location, out / "adapter", last)
    if (out / "model").is_dir():
        return MergePlan(models.local(ctx, out / "model"), None, last)
    raise StageInputMissing(f"merge: {ctx.relative(out)} holds neither adapter/ nor model/")


def validate(ctx: StageContext) -> None:
    p = plan(ctx)
    models.check_model_dir(p.model, "merge input")
    if p.adapter is not None and not (p.adapter / "adapter_config.json").is_file():
        raise StageInputMissing(f"merge: no adapter_config.json in {ctx.relative(p.adapter)}")


def run(ctx: StageContext) -> StageOutcome:
    from transformers import AutoModelForCausalLM

    p = plan(ctx)
    dtype = ctx.config.dtype
    tokenizer_source = models.locate(ctx, ctx.spec.tokenizer) if ctx.spec.tokenizer else p.model
    tokenizer = models.load_tokenizer(tokenizer_source)
    if p.adapter is not None:
        # Fold in float32 (exact to rounding), then cast once: merging in bf16 rounds twice.
        model = models.merge_adapter(p.model, p.adapter, AutoModelForCausalLM, "float32")
    else:
        model = AutoModelForCausalLM.from_pretrained(p.model.id, dtype=models.torch_dtype(dtype), **p.model.kwargs())
    if ctx.is_main:
        models.save_standalone(model, tokenizer, ctx.staging_dir / "model", dtype)
    inputs = {"model": p.model.label, "sourceStage": p.source_stage}
    if p.adapter is not None:
        inputs["adapter"] = ctx.relative(p.adapter)
    what = f"merged {inputs.get('adapter')} into {p.model.label}" if p.adapter else f"converted {p.model.label}"
    return StageOutcome(
        metrics={"parameters": float(sum(t.numel() for t in model.parameters()))},
        inputs=inputs,
        details={"dtype": dtype},
        message=f"{what} ({dtype})",
    )
