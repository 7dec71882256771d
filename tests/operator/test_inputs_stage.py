"""The inputs stage from the operator's side: when it runs, the offline env and the cache volume it gives
the later stages, the chart's default cache claim, and the revisions in the run's status."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rlhf_api.layout import RunRef, StageResult
from rlhf_api.run import RLHFRunSpec, RLHFRunStatus
from rlhf_operator.children import build_job
from rlhf_operator.cli.cluster import render_status
from rlhf_operator.defaults import OperatorDefaults
from rlhf_operator.observe import JobObservation, Observed
from rlhf_operator.planner import RunView, keep_started_pipeline, plan

from .harness import tiny_run

RUN = RunRef(name="tiny", namespace="ns", uid="uid-1")
NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_spec(**changes: Any) -> RLHFRunSpec:
    """The tiny run with its base model named by hub id (a remote input)."""
    return RLHFRunSpec.model_validate(
        tiny_run(baseModel={"name": "org/tiny", "revision": "main"}, **changes)["spec"], strict=False
    )


def env_of(job: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}


def mounts_of(job: dict[str, Any]) -> dict[str, Any]:
    return {m["name"]: m for m in job["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}


def test_the_stage_runs_first_only_when_an_input_is_remote() -> None:
    local = RLHFRunSpec.model_validate(tiny_run()["spec"], strict=False)
    assert local.pipeline() == ("sft", "reward", "ppo", "merge")
    assert hub_spec().pipeline() == ("inputs", "sft", "reward", "ppo", "merge")
    assert hub_spec(inputs={"enabled": False}).pipeline() == ("sft", "reward", "ppo", "merge")
    # a remote dataset alone is enough
    remote_data = tiny_run()
    remote_data["spec"]["reward"]["dataset"] = {"name": "Anthropic/hh-rlhf"}
    assert RLHFRunSpec.model_validate(remote_data["spec"]).pipeline()[0] == "inputs"


def test_stages_after_it_run_offline_and_it_does_not() -> None:
    spec = hub_spec()
    inputs_env, sft_env = env_of(build_job(RUN, spec, "inputs")), env_of(build_job(RUN, spec, "sft"))
    assert "HF_HUB_OFFLINE" not in inputs_env and "HF_DATASETS_OFFLINE" not in inputs_env
    assert (sft_env["HF_HUB_OFFLINE"], sft_env["HF_DATASETS_OFFLINE"]) == ("1", "1")
    assert sft_env["RLHF_INPUT_CACHE"] == inputs_env["RLHF_INPUT_CACHE"] == "/workspace/.cache/inputs"
    # Without the inputs stage every stage downloads for itself: the hubs stay online.
    assert "HF_HUB_OFFLINE" not in env_of(build_job(RUN, hub_spec(inputs={"enabled": False}), "sft"))
    # The inputs stage needs no GPU.
    assert "nvidia.com/gpu" not in build_job(RUN, spec, "inputs")["spec"]["template"]["spec"]["containers"][0][
        "resources"
    ].get("limits", {})


def test_a_shared_cache_claim_is_writable_by_the_inputs_stage_only() -> None:
    spec = hub_spec(storage={"inputCache": {"claimName": "model-cache"}})
    inputs_job, ppo_job = build_job(RUN, spec, "inputs"), build_job(RUN, spec, "ppo")
    for job, read_only in ((inputs_job, False), (ppo_job, True)):
        mount = mounts_of(job)["input-cache"]
        assert (mount["mountPath"], mount["readOnly"]) == ("/input-cache", read_only)
        volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
        assert volumes["input-cache"]["persistentVolumeClaim"] == {"claimName": "model-cache"}
        assert env_of(job)["RLHF_INPUT_CACHE"] == "/input-cache"


def test_the_chart_default_claim_fills_runs_that_name_none() -> None:
    defaults = OperatorDefaults.from_env({"RLHF_DEFAULT_INPUT_CACHE_CLAIM": "team-cache"})
    filled = defaults.apply(hub_spec())
    assert filled.storage.input_cache is not None and filled.storage.input_cache.claim_name == "team-cache"
    own = defaults.apply(hub_spec(storage={"inputCache": {"claimName": "mine"}}))
    assert own.storage.input_cache is not None and own.storage.input_cache.claim_name == "mine"


def done(stage: str, inputs: list[dict[str, Any]] | None = None) -> JobObservation:
    result = StageResult.model_validate({"stage": stage, "succeeded": True, "inputs": inputs or []})
    return JobObservation(
        name=f"tiny-{stage}", stage=stage, uid=f"job-{stage}", complete=True, succeeded=1, result=result
    )


def test_resolved_revisions_reach_the_status_and_rlhfctl_status() -> None:
    resolved = [
        {"field": "baseModel", "source": "org/tiny", "revision": COMMIT, "requested": "main", "cache": "miss"},
        {"field": "sft.dataset", "source": "assets/data/sft.jsonl", "revision": "mtime:abc", "cache": "local"},
    ]
    view = RunView("tiny", "ns", "uid-1", 1, hub_spec(), None, {})
    status = plan(view, Observed({"inputs": done("inputs", resolved), "sft": done("sft")}, True), NOW).status
    entry = next(s for s in status.stages if s.name == "inputs")
    assert [i.to_wire() for i in entry.inputs] == resolved
    assert next(s for s in status.stages if s.name == "sft").inputs == []
    text = render_status("tiny", {"spec": {}, "status": status.to_wire()})
    assert f"input baseModel: org/tiny@{COMMIT} (asked main) [miss]" in text
    assert "input sft.dataset: assets/data/sft.jsonl@mtime:abc [local]" in text


def test_every_source_field_of_a_section_is_seen() -> None:
    """pipeline() and the inputs stage find every model and dataset a section names, however deep
    (rlhf_api.run._source_fields): one missed would be read from the hub with the hubs offline."""
    from typing import get_args

    from rlhf_api.base import ApiModel
    from rlhf_api.methods import STAGE_KINDS
    from rlhf_api.run import _source_fields
    from rlhf_api.sources import DatasetSource, ModelSource

    def all_sources(model: type[ApiModel], seen: frozenset[type]) -> set[tuple[str, ...]]:
        found = set()
        for name, info in model.model_fields.items():
            for t in (info.annotation, *get_args(info.annotation)):
                if t in (ModelSource, DatasetSource):
                    found.add((name,))
                elif isinstance(t, type) and issubclass(t, ApiModel) and t not in seen:
                    found |= {(name, *path) for path in all_sources(t, seen | {t})}
        return found

    fields = RLHFRunSpec.model_fields
    sections = {
        s: get_args(fields[s].annotation)[0] if get_args(fields[s].annotation) else fields[s].annotation
        for s in STAGE_KINDS
    }
    for section in sections.values():
        assert {path for path, _ in _source_fields(section)} == all_sources(section, frozenset({section})), section
    assert (("reward_model",), "rewardModel") in _source_fields(sections["ppo"])
    assert (("watch", "preference_set"), "watch.preferenceSet") in _source_fields(sections["ppo"])
    # ... and a hub preference set is staged like any other input.
    run = tiny_run()
    run["spec"]["ppo"]["watch"] = {"preferenceSet": {"name": "org/prefs"}}
    spec = RLHFRunSpec.model_validate(run["spec"], strict=False)
    assert ("ppo.watch.preferenceSet", spec.ppo.watch.preference_set) in spec.input_sources()
    assert spec.pipeline()[0] == "inputs"


def test_a_run_that_started_without_the_inputs_stage_keeps_going_without_it() -> None:
    """An operator upgrade must not put the inputs stage in front of a run already training: that
    would make the stage in progress train again from step 0 (planner.keep_started_pipeline)."""
    before_upgrade = RLHFRunStatus.model_validate(
        {"phase": "Running", "stages": [{"name": "sft", "phase": "Succeeded"}, {"name": "reward", "phase": "Running"}]}
    )
    spec = keep_started_pipeline(hub_spec(), before_upgrade)
    assert spec.pipeline() == ("sft", "reward", "ppo", "merge")
    assert "HF_HUB_OFFLINE" not in env_of(build_job(RUN, spec, "reward"))  # it downloads for itself, as before
    view = RunView("tiny", "ns", "uid-1", 1, spec, before_upgrade, {})
    status = plan(view, Observed({"sft": done("sft")}, True), NOW).status
    assert [s.name for s in status.stages] == ["sft", "reward", "ppo", "merge"]
    # A new run, and a run planned with the stage, keep it.
    assert keep_started_pipeline(hub_spec(), None).pipeline()[0] == "inputs"
    with_inputs = RLHFRunStatus.model_validate({"phase": "Running", "stages": [{"name": "inputs", "phase": "Running"}]})
    assert keep_started_pipeline(hub_spec(), with_inputs).pipeline()[0] == "inputs"
