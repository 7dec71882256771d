"""Operator-wide defaults (the chart's stageDefaults) fill only what a run leaves unset."""

from __future__ import annotations

from typing import Any

import pytest

from rlhf_operator.api import RLHFRun
from rlhf_operator.api.runtime import DEFAULT_STAGE_IMAGE
from rlhf_operator.children import RunIdentity, build_job, build_pvc
from rlhf_operator.defaults import OperatorDefaults
from tests.api.builders import minimal_run, patched

ENV = {
    "RLHF_DEFAULT_STAGE_IMAGE": "registry.example/stages@sha256:abc",
    "RLHF_DEFAULT_STORAGE_CLASS": "fast-rwo",
    "RLHF_DEFAULT_STAGE_CPU": "8",
    "RLHF_DEFAULT_STAGE_MEMORY": "64Gi",
}
RUN = RunIdentity(name="run", namespace="ml", uid="u-1")


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
        ("spec.sft.resources", {"cpu": "2"}, "registry.example/stages@sha256:abc", "fast-rwo", "2", "64Gi"),
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
