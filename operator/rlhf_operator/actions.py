"""What the planner asks for. Plain data: kube.Cluster performs them, tests compare them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EnsurePVC:
    """Create the workspace PVC (AlreadyExists is success)."""

    manifest: dict[str, Any]


@dataclass(frozen=True)
class CreateJob:
    """Create a multi-node stage's rendezvous Service, then the stage's Job, which carries the stage's
    config (AlreadyExists is success for both)."""

    job: dict[str, Any]
    service: dict[str, Any] | None = None
    """Created before the Job, so that its Pods find the Service's address in their environment."""

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
    """Delete a Job and its pods: in the background (a failed stage being retried, a Kueue-queued stage
    that timed out), or, with ``wait_for_pods``, in the foreground: the Job stays, marked for deletion,
    until its Pods are gone (a Kueue-queued stage being suspended: the resumed Job must not start while
    the old Pod still writes its checkpoint)."""

    name: str
    wait_for_pods: bool = False


@dataclass(frozen=True)
class PostEvent:
    """An event on the run."""

    type: str  # Normal or Warning
    reason: str
    message: str


Action = EnsurePVC | CreateJob | SetJobSuspend | DeleteJob | PostEvent
