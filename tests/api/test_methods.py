"""The method table (rlhf_api.methods) is the one place a method is declared: what is derived from it agrees."""

from __future__ import annotations

from typing import get_args

import pytest

from rlhf_api import ModelSource, RLAIFStage, RLHFRunSpec, layout, methods
from rlhf_api.run import Method


def test_every_stage_a_method_runs_is_a_known_stage_with_a_spec_section() -> None:
    for name, method in methods.METHODS.items():
        for stages in (method.stages, *method.then.values()):
            assert set(stages) <= set(methods.STAGE_KINDS), name
            assert stages[-1] == "merge", name
        assert set(method.required) <= set(method.stages), name
    for stage in methods.STAGE_KINDS:
        assert stage in RLHFRunSpec.model_fields, f"{stage} has no section on RLHFRunSpec"


def test_the_spec_accepts_exactly_the_methods_of_the_table() -> None:
    # spec.method's Literal is written out (mypy needs a literal); it must name the table's methods.
    assert list(get_args(Method)) == list(methods.METHODS)


def test_derived_sets_follow_the_roles() -> None:
    assert {"sft", "ppo", "dpo", "rest", "grpo", "rloo"} == methods.POLICY_STAGES
    assert layout.POLICY_STAGES is methods.POLICY_STAGES
    assert set(methods.REWARD_CONSUMERS) == {"ppo", "grpo", "rloo", "rest"}
    assert set(methods.PAIR_TRAINED) == {"reward", "dpo"}
    assert methods.LABELLING_METHODS == ("RLAIF",)
    # The aligned policy is never SFT's: SFT is what it is compared with.
    assert set(methods.ALIGNED_POLICY_STAGES) == methods.POLICY_STAGES - {"sft"}
    # Issue 17's contract: the stages that train one model over several Pods, and the Trainer-based
    # ones among them that may shard it with FSDP (the admission rules are generated from these).
    assert set(methods.MULTI_NODE_STAGES) == {"sft", "reward", "dpo", "ppo", "grpo", "rloo"}
    assert set(methods.FSDP_STAGES) == {"sft", "reward", "dpo"}
    assert all("DDP" in kind.shardings for kind in methods.STAGE_KINDS.values())


@pytest.mark.parametrize(
    ("rlaif", "expected"),
    [
        (None, ("sft", "rlaif", "reward", "ppo", "merge")),
        ({"then": "PPO"}, ("sft", "rlaif", "reward", "ppo", "merge")),
        ({"then": "DPO"}, ("sft", "rlaif", "dpo", "merge")),
    ],
)
def test_rlaif_then_picks_the_pipeline(rlaif: dict[str, str] | None, expected: tuple[str, ...]) -> None:
    assert methods.pipeline("RLAIF", None if rlaif is None else rlaif["then"]) == expected
    # The spec's own pipeline() reads the labelling stage's then (the sections' other rules are not the point).
    section = None if rlaif is None else RLAIFStage.model_construct(**rlaif)
    # A base model on the volume: no remote input, so no inputs stage before the method's own.
    local = ModelSource(path="models/base")
    assert RLHFRunSpec.model_construct(method="RLAIF", rlaif=section, base_model=local).pipeline() == expected


def test_other_methods_ignore_then() -> None:
    assert methods.pipeline("PPO", "DPO") == ("sft", "reward", "ppo", "merge")
