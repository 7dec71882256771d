"""Operator-wide defaults for fields a run leaves unset (the chart's ``stageDefaults``).

The platform team sets them once at install time (Helm values become ``RLHF_DEFAULT_*``
environment variables of the operator); every run that leaves the field unset gets them. Applying
them is a pure function of the spec, done before planning, so the planner and builders stay pure.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rlhf_api.run import RLHFRunSpec
from rlhf_api.runtime import DEFAULT_STAGE_IMAGE, InputCache


@dataclass(frozen=True)
class OperatorDefaults:
    """What the operator fills in when a run does not say."""

    stage_image: str | None = None
    """Replaces the API's built-in stage image (the CRD fills that in, so it stands for "unset")."""
    storage_class: str | None = None
    """StorageClass of workspace PVCs the operator creates, when the run names none."""
    stage_cpu: str | None = None
    """CPU of a stage pod whose resources set neither CPU nor memory."""
    stage_memory: str | None = None
    """Memory of a stage pod whose resources set neither CPU nor memory."""
    input_cache_claim: str | None = None
    """The PVC runs share as their input cache (``storage.inputCache``), when a run names none."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> OperatorDefaults:
        def get(name: str) -> str | None:
            return env.get(name) or None

        return cls(
            stage_image=get("RLHF_DEFAULT_STAGE_IMAGE"),
            storage_class=get("RLHF_DEFAULT_STORAGE_CLASS"),
            stage_cpu=get("RLHF_DEFAULT_STAGE_CPU"),
            stage_memory=get("RLHF_DEFAULT_STAGE_MEMORY"),
            input_cache_claim=get("RLHF_DEFAULT_INPUT_CACHE_CLAIM"),
        )

    def apply(self, spec: RLHFRunSpec) -> RLHFRunSpec:
        """The spec with these defaults filled into the fields it leaves unset."""
        update: dict[str, Any] = {}
        if self.stage_image and spec.runtime.image == DEFAULT_STAGE_IMAGE:
            update["runtime"] = spec.runtime.model_copy(update={"image": self.stage_image})
        storage = spec.storage
        if self.storage_class and storage.existing_claim is None and storage.storage_class_name is None:
            storage = storage.model_copy(update={"storage_class_name": self.storage_class})
        if self.input_cache_claim and storage.input_cache is None:
            storage = storage.model_copy(update={"input_cache": InputCache(claim_name=self.input_cache_claim)})
        if storage is not spec.storage:
            update["storage"] = storage
        for name in spec.pipeline():
            section = spec.stage(name)
            if section is None:
                continue
            resources = section.resources
            # Only a stage that sets neither CPU nor memory gets the defaults, both of them: a stage
            # that sets one was sized by its author, and a default would add a limit (requests equal
            # limits) they did not choose, e.g. a CPU limit on a run that asked for memory only.
            # (A stage left with neither still gets a small request: children.FALLBACK_REQUESTS.)
            if resources.cpu is not None or resources.memory is not None:
                continue
            filled = {key: value for key, value in (("cpu", self.stage_cpu), ("memory", self.stage_memory)) if value}
            if filled:
                update[name] = section.model_copy(update={"resources": resources.model_copy(update=filled)})
        return spec.model_copy(update=update) if update else spec
