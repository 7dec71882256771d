"""Fixtures for the chart tests (the shared control plane fixture is in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_operator.dev.controlplane import ControlPlane

from .tools import Helm, write_schemas

# Every kind the chart renders (but the ServiceMonitor, whose CRD the test server lacks) and the
# RLHFRun examples: kubeconform gets a schema for each from the test API server's OpenAPI.
KINDS = {
    ("v1", "ServiceAccount"),
    ("v1", "Service"),
    ("v1", "Pod"),
    ("apps/v1", "Deployment"),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition"),
    ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicy"),
    ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicyBinding"),
    ("rlhf-operator.io/v1alpha1", "RLHFRun"),
}


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(tmp_path_factory.mktemp("helm"))


@pytest.fixture(scope="session")
def schemas(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_schemas(control_plane, tmp_path_factory.mktemp("schemas"), KINDS)
