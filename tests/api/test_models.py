"""The API models themselves: documentation, generated files, defaults, offline validation."""

from __future__ import annotations

import pytest
import yaml

from rlhf_api import RLHFRun, RLHFRunSpec
from rlhf_api.generate import GENERATED, stale_files
from rlhf_api.reference import _walk
from rlhf_api.validation import validate_manifest

from .builders import EXAMPLES, REPO, minimal_run, patched


def test_every_field_of_every_type_is_documented():
    undocumented = [
        f"{model.__name__}.{name}"
        for model in _walk(RLHFRun)
        for name, field in model.model_fields.items()
        if not (field.description or "").strip()
    ]
    assert undocumented == []


def test_every_type_is_documented():
    assert [m.__name__ for m in _walk(RLHFRun) if not (m.__doc__ or "").strip()] == []


def test_generated_files_are_fresh():
    assert stale_files() == [], "run `make generate`"


def test_stale_check_detects_an_edit(tmp_path):
    for rel, produce in GENERATED.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(produce())
    assert stale_files(tmp_path) == []
    crd = tmp_path / "crds/rlhfruns.rlhf-operator.io.yaml"
    crd.write_text(crd.read_text().replace("miniBatchSize", "minibatchSize"))
    assert stale_files(tmp_path) == ["crds/rlhfruns.rlhf-operator.io.yaml"]


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_validate_offline(example):
    model, errors = validate_manifest(yaml.safe_load(example.read_text()))
    assert errors == []
    assert model is not None


def test_minimal_example_is_short():
    lines = [ln for ln in (REPO / "examples/minimal.yaml").read_text().splitlines() if ln.strip()]
    assert len(lines) <= 15


def test_defaults_fill_a_minimal_spec():
    run = RLHFRun.model_validate(minimal_run())
    assert run.spec.pipeline() == ("inputs", "sft", "reward", "ppo", "merge")  # hub ids: inputs first
    assert run.spec.ppo is not None and run.spec.ppo.adaptive_kl is True
    assert run.spec.sft is not None and run.spec.sft.lora.enabled is True
    assert run.spec.merge.enabled is True


def test_wire_form_round_trips():
    spec = RLHFRun.model_validate(minimal_run()).spec
    again = RLHFRunSpec.model_validate(spec.to_wire())
    assert again == spec


@pytest.mark.parametrize(
    ("method", "extra", "pipeline"),
    [
        ("DPO", {"dpo": {"dataset": {"name": "a/b"}}}, ("sft", "dpo", "merge")),
        ("GRPO", {"grpo": {"dataset": {"name": "a/b"}}}, ("sft", "reward", "grpo", "merge")),
        (
            # The reward stage trains on the labelled pairs: no dataset of its own.
            "RLAIF",
            {
                "rlaif": {"judge": {"name": "a/j"}, "constitution": ["be kind"], "dataset": {"name": "a/b"}},
                "reward": {},
            },
            ("sft", "rlaif", "reward", "ppo", "merge"),
        ),
        (
            "RLAIF",
            {
                "rlaif": {
                    "judge": {"name": "a/j"},
                    "constitution": ["be kind"],
                    "dataset": {"name": "a/b"},
                    "then": "DPO",
                },
                "reward": None,
                "dpo": {},
            },
            ("sft", "rlaif", "dpo", "merge"),
        ),
    ],
)
def test_methods_choose_their_pipeline(method, extra, pipeline):
    doc = patched(minimal_run(), "spec.method", method)
    doc["spec"].update(extra)
    doc["spec"] = {k: v for k, v in doc["spec"].items() if v is not None}
    model, errors = validate_manifest(doc)
    assert errors == []
    # minimal_run names hub ids: the inputs stage stages them first (docs/inputs.md)
    assert model is not None and model.spec.pipeline() == ("inputs", *pipeline)


def test_errors_name_every_bad_field_at_once():
    doc = patched(patched(minimal_run(), "spec.ppo.miniBatchSize", 0), "spec.sft.lora", {"r": 0})
    _, errors = validate_manifest(doc)
    assert any(e.startswith("spec.ppo.miniBatchSize") for e in errors)
    assert any(e.startswith("spec.sft.lora.r") for e in errors)


def test_a_watch_check_pattern_that_does_not_compile_is_refused_offline_naming_the_field():
    # CEL cannot compile Python regular expressions: the API server admits it, the operator, rlhfctl
    # validate and the stage refuse it (docs/watch.md).
    good = {"name": "no-links", "mustNotMatch": "(?i)https?://", "maxChars": 400}
    doc = patched(minimal_run(), "spec.ppo.watch", {"checks": [good, {"name": "ends", "mustMatch": "[.$"}]})
    _, errors = validate_manifest(doc)
    assert len(errors) == 1 and errors[0].startswith("spec.ppo.watch.checks[1].mustMatch"), errors
    assert "not a Python regular expression" in errors[0]
    assert validate_manifest(patched(minimal_run(), "spec.ppo.watch", {"checks": [good]}))[1] == []


def _reward_case(method: str, section: str, reward: dict | None, policy: dict) -> dict:
    doc = minimal_run()
    spec = {k: v for k, v in doc["spec"].items() if k not in ("reward", "ppo")}
    spec.update(method=method, **{section: {"dataset": {"name": "a/prompts"}, **policy}})
    if method == "RLAIF":
        spec["rlaif"] = {"judge": {"name": "a/j"}, "constitution": ["be kind"], "dataset": {"name": "a/b"}}
    if reward is not None:
        spec["reward"] = reward
    return {**doc, "spec": spec}


OFF = {"enabled": False}
RM = {"rewardModel": {"name": "a/rm"}}


@pytest.mark.parametrize(
    ("method", "section", "reward", "policy", "valid"),
    [
        ("PPO", "ppo", OFF, {}, False),
        ("PPO", "ppo", OFF, RM, True),
        ("PPO", "ppo", OFF, OFF, True),  # no policy stage, no reward model needed
        ("PPO", "ppo", {"dataset": {"name": "a/pairs"}}, {}, True),
        ("GRPO", "grpo", OFF, {}, False),
        ("GRPO", "grpo", OFF, {"rewardModel": {"path": "models/rm"}}, True),
        ("RLOO", "rloo", OFF, {}, False),
        ("RLOO", "rloo", OFF, RM, True),
        ("ReST", "rest", OFF, {}, False),
        ("ReST", "rest", OFF, RM, True),
        ("RLAIF", "ppo", {}, {}, True),  # the reward stage trains on the AI-labelled pairs
        ("RLAIF", "ppo", OFF, {}, False),
        ("RLAIF", "ppo", OFF, RM, True),
    ],
)
def test_a_policy_stage_needs_a_reward_model_source(method, section, reward, policy, valid):
    model, errors = validate_manifest(_reward_case(method, section, reward, policy))
    if valid:
        assert errors == [] and model is not None
        return
    assert errors == [
        f"spec.{section}.rewardModel: the {section} stage optimises against a reward model and this run has "
        f"none: enable the reward stage or set {section}.rewardModel"
    ]


def test_rlaif_then_dpo_and_dpo_need_no_reward_model():
    rlaif = _reward_case("RLAIF", "dpo", None, {})
    rlaif["spec"]["dpo"] = {}
    rlaif["spec"]["rlaif"]["then"] = "DPO"
    dpo = _reward_case("DPO", "dpo", None, {})
    for doc in (rlaif, dpo):
        model, errors = validate_manifest(doc)
        assert errors == [] and model is not None
