"""Operator-wide defaults (the chart's stageDefaults) fill only what a run leaves unset."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from rlhf_api import RLHFRun
from rlhf_api.layout import RunRef
from rlhf_api.runtime import DEFAULT_STAGE_IMAGE
from rlhf_operator.children import build_job, build_pvc
from rlhf_operator.defaults import OperatorDefaults
from tests.api.builders import REPO, load_example, minimal_run, patched

ENV = {
    "RLHF_DEFAULT_STAGE_IMAGE": "registry.example/stages@sha256:abc",
    "RLHF_DEFAULT_STORAGE_CLASS": "fast-rwo",
    "RLHF_DEFAULT_STAGE_CPU": "8",
    "RLHF_DEFAULT_STAGE_MEMORY": "64Gi",
}
RUN = RunRef(name="run", namespace="ml", uid="u-1")


def spec_of(doc: dict[str, Any]) -> Any:
    return RLHFRun.model_validate(doc).spec


def test_from_env_reads_every_variable_and_treats_empty_as_unset():
    assert OperatorDefaults.from_env(ENV) == OperatorDefaults(
        "registry.example/stages@sha256:abc", "fast-rwo", "8", "64Gi"
    )
    assert OperatorDefaults.from_env({"RLHF_DEFAULT_STAGE_CPU": ""}) == OperatorDefaults()


@pytest.mark.parametrize(
    ("path", "value", "image", "storage_class", "sft_cpu", "sft_memory"),
    [
        (None, None, "registry.example/stages@sha256:abc", "fast-rwo", "8", "64Gi"),
        ("spec.runtime", {"image": "mine:1"}, "mine:1", "fast-rwo", "8", "64Gi"),
        ("spec.storage", {"storageClassName": "rwx"}, "registry.example/stages@sha256:abc", "rwx", "8", "64Gi"),
        ("spec.storage", {"existingClaim": "data"}, "registry.example/stages@sha256:abc", None, "8", "64Gi"),
        # A stage that sets CPU or memory was sized by its author: the other stays unset (no limit added).
        ("spec.sft.resources", {"cpu": "2"}, "registry.example/stages@sha256:abc", "fast-rwo", "2", None),
        ("spec.sft.resources", {"memory": "4Gi"}, "registry.example/stages@sha256:abc", "fast-rwo", None, "4Gi"),
    ],
)
def test_defaults_fill_only_unset_fields(path, value, image, storage_class, sft_cpu, sft_memory):
    doc = minimal_run() if path is None else patched(minimal_run(), path, value)
    spec = OperatorDefaults.from_env(ENV).apply(spec_of(doc))
    assert spec.runtime.image == image
    assert spec.storage.storage_class_name == storage_class
    assert (spec.sft.resources.cpu, spec.sft.resources.memory) == (sft_cpu, sft_memory)
    # Merge declares its own compute in the API; a default never overrides what is set.
    assert spec.merge.resources.cpu == "4"


def test_no_defaults_change_nothing():
    spec = spec_of(minimal_run())
    assert OperatorDefaults().apply(spec) is spec
    assert spec.runtime.image == DEFAULT_STAGE_IMAGE


def test_defaults_reach_the_built_objects():
    spec = OperatorDefaults.from_env(ENV).apply(spec_of(minimal_run()))
    container = build_job(RUN, spec, "sft")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example/stages@sha256:abc"
    assert container["resources"]["limits"]["cpu"] == "8"
    assert build_pvc(RUN, spec)["spec"]["storageClassName"] == "fast-rwo"


def test_memory_only_runs_get_no_cpu_default():
    """examples/tiny.yaml asks for memory only (the node tier runs it on 2 cores): the chart's CPU
    default must not add a CPU limit that would throttle it, nor a request that cannot schedule."""
    doc = load_example("tiny.yaml")
    spec = OperatorDefaults.from_env(ENV).apply(spec_of(doc))
    for stage in spec.pipeline():
        resources = spec.stage(stage).resources
        assert (resources.cpu, resources.memory) == (None, "4Gi"), stage
        container = build_job(RUN, spec, stage)["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"] == {"requests": {"memory": "4Gi"}, "limits": {"memory": "4Gi"}}


def test_stage_pods_are_never_best_effort():
    """The chart's defaults fill a stage that sets neither CPU nor memory; with no defaults at all the
    operator still requests a little (requests only, no limit), so no stage Pod is BestEffort."""
    doc = patched(minimal_run(), "spec.sft.resources", {"gpus": 1})
    with_defaults = OperatorDefaults.from_env(ENV).apply(spec_of(doc))
    res = build_job(RUN, with_defaults, "sft")["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert res["requests"] == res["limits"] == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "1"}
    without = OperatorDefaults().apply(spec_of(doc))
    res = build_job(RUN, without, "sft")["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert res["requests"] == {"nvidia.com/gpu": "1", "cpu": "100m", "memory": "256Mi"}
    assert res["limits"] == {"nvidia.com/gpu": "1"}


def test_the_chart_ships_non_empty_stage_defaults():
    values = yaml.safe_load((REPO / "charts" / "rlhf-operator" / "values.yaml").read_text())
    resources = values["stageDefaults"]["resources"]
    assert resources["cpu"] and resources["memory"]
    # The same as the merge stage declares for itself in the API.
    assert spec_of(minimal_run()).merge.resources.model_dump(include={"cpu", "memory"}) == resources
