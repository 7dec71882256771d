"""What the planner asks for. Plain data: the executor performs them, tests compare them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EnsurePVC:
    """Create the workspace PVC (AlreadyExists is success)."""

    manifest: dict[str, Any]


@dataclass(frozen=True)
class CreateJob:
    """Write the stage's ConfigMap (create or replace), then create its Job (AlreadyExists is success)."""

    config_map: dict[str, Any]
    job: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.job["metadata"]["name"])


@dataclass(frozen=True)
class SetJobSuspend:
    """Patch a Job's spec.suspend."""

    name: str
    suspend: bool


@dataclass(frozen=True)
class DeleteJob:
    """Delete a Job and, in the background, its pods (a failed stage being retried)."""

    name: str


@dataclass(frozen=True)
class PostEvent:
    """An event on the run."""

    type: str  # Normal or Warning
    reason: str
    message: str


Action = EnsurePVC | CreateJob | SetJobSuspend | DeleteJob | PostEvent
