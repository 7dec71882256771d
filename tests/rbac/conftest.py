"""A private control plane with the chart installed twice, RBAC only as the chart renders it:

- release ``rlhf-operator`` in ``rlhf-system``, every namespace: its ServiceAccount is
  ``system:serviceaccount:rlhf-system:rlhf-operator``, the very identity the control plane's
  static operator token carries (``plane.operator``), so the operator can run as it;
- release ``scoped`` in ``rlhf-scoped``, watching only ``team-a`` and ``team-b``.

Private, because the shared session plane also holds deploy/rbac.yaml's grants for that identity:
here nothing but the chart grants it anything.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from rlhf_operator.dev import controlplane
from rlhf_operator.dev.controlplane import ControlPlane
from tests.chart.tools import CHART, Helm, stop_quickly, wait_established

CLUSTER_WIDE = "system:serviceaccount:rlhf-system:rlhf-operator"
SCOPED = "system:serviceaccount:rlhf-scoped:scoped-rlhf-operator"
WATCHED = ("team-a", "team-b")
OTHER = "other"


@dataclass
class Installed:
    plane: ControlPlane
    helm: Helm


@pytest.fixture(scope="package")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    plane = controlplane.start(tmp_path_factory.mktemp("rbac-plane"))
    try:
        helm = Helm(tmp_path_factory.mktemp("rbac-helm"))
        for namespace in (*WATCHED, OTHER):
            plane.kubectl("create", "namespace", namespace)
        kubeconfig = plane.kubeconfig()
        helm("install", "rlhf-operator", str(CHART), "-n", "rlhf-system", "--create-namespace", kubeconfig=kubeconfig)
        wait_established(plane)
        helm(
            "install",
            "scoped",
            str(CHART),
            "-n",
            "rlhf-scoped",
            "--create-namespace",
            "--set",
            "crds.enabled=false",
            "--set",
            f"watchNamespaces={{{','.join(WATCHED)}}}",
            kubeconfig=kubeconfig,
        )
        assert plane.operator.name == CLUSTER_WIDE
        yield Installed(plane, helm)
    finally:
        stop_quickly(plane)
