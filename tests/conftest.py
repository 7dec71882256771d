"""Shared fixtures. The control plane is real: etcd + kube-apiserver built from source."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlhf_operator.dev import controlplane

# One torch thread in this process and every stage process it starts: tiny models gain nothing from
# more, the CI machine has 2 cores shared by five pytest processes (tests/run_suite.py), and a
# learning test's numbers must not depend on which other tests happened to be collected with it
# (this line lived in tests/stages/conftest.py, which only a run collecting tests/stages imports).
os.environ.setdefault("OMP_NUM_THREADS", "1")

# CPU per test at the end of the run: on the saturated CI machine, what a test really costs.
pytest_plugins = ["tests.cputime"]

REPO = Path(__file__).resolve().parents[1]
CRD_FILE = REPO / "crds" / "rlhfruns.rlhf-operator.io.yaml"


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[controlplane.ControlPlane]:
    """A running kube-apiserver with the RLHFRun CRD installed, shared by the whole session."""
    plane = controlplane.start(tmp_path_factory.mktemp("controlplane"))
    try:
        plane.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
        # `kubectl wait` errors out (instead of waiting) while the new CRD has no status.conditions yet.
        for _ in range(60):
            if plane.kubectl(
                "wait", "--for=condition=Established", "--timeout=60s", "crd/rlhfruns.rlhf-operator.io", check=False
            ).startswith("customresourcedefinition"):
                break
            time.sleep(0.5)
        _wait_for_openapi(plane)
        yield plane
    finally:
        plane.stop()


def _wait_for_openapi(plane: controlplane.ControlPlane) -> None:
    # Established means the API serves the kind; its OpenAPI (explain, field validation) follows a
    # moment later.
    deadline = time.monotonic() + 60
    while "FIELD" not in plane.kubectl("explain", "rlhfrun.spec", check=False):
        if time.monotonic() > deadline:
            raise TimeoutError("the RLHFRun OpenAPI schema was never published")
        time.sleep(0.5)


@pytest.fixture
def namespace(control_plane: controlplane.ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test (never deleted: there is no namespace controller to finalize it)."""
    # Unique by construction: parametrized cases share their first 40 characters.
    prefix = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    name = f"t-{prefix}-{uuid.uuid4().hex[:8]}"
    control_plane.kubectl("create", "namespace", name)
    yield name


def kubectl_error(exc: subprocess.CalledProcessError) -> str:
    return f"{exc.stdout}\n{exc.stderr}"
