"""Fixtures for the operator's integration tests (the control plane fixture is in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rlhf_operator.dev.controlplane import ControlPlane

from .harness import REPO, Env


@pytest.fixture(scope="session")
def rbac(control_plane: ControlPlane) -> ControlPlane:
    """The operator's identity gets exactly the rights deploy/rbac.yaml grants."""
    control_plane.kubectl("apply", "-f", str(REPO / "deploy" / "rbac.yaml"))
    return control_plane


@pytest.fixture
def env(rbac: ControlPlane, namespace: str, tmp_path: Path) -> Iterator[Env]:
    world = Env(rbac, namespace, tmp_path)
    try:
        yield world
    finally:
        world.stop_all()
