"""The chart's values: documented, schema-checked (unknown keys rejected), and rendered as intended.

No API server needed: helm lint and helm template only.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from rlhf_api.generate import GENERATED

from . import valuesdoc
from .tools import CHART, REPO, Helm, by_kind, value_sets

VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
# Kubernetes types passed through as they are: the schema lists their fields, values set a few.
K8S_TYPED = {"podSecurityContext", "securityContext", "affinity", "resources"}


def test_every_value_is_documented() -> None:
    keys = valuesdoc.parse((CHART / "values.yaml").read_text())
    undocumented = [k.path for k in keys if not k.description]
    assert not undocumented, f"values without a `# --` comment: {undocumented}"
    assert {k.path.split(".")[0] for k in keys} == set(VALUES)


def test_values_table_in_readme_is_current() -> None:
    readme = (CHART / "README.md").read_text()
    assert readme == valuesdoc.render_readme(readme, (CHART / "values.yaml").read_text()), (
        "run `make generate`: the chart README's values table is stale"
    )


def _compare(values: dict[str, Any], schema: dict[str, Any], path: str) -> list[str]:
    problems = []
    props = schema.get("properties", {})
    if schema.get("additionalProperties") is not False:
        problems.append(f"{path or '<root>'}: schema accepts unknown keys")
    for key, value in values.items():
        where = f"{path}.{key}".lstrip(".")
        if key not in props:
            problems.append(f"{where}: in values.yaml, not in values.schema.json")
        elif isinstance(value, dict) and value and key not in K8S_TYPED:
            problems += _compare(value, props[key], where)
    if path.split(".", maxsplit=1)[0] not in K8S_TYPED:
        problems += [
            f"{path}.{k}".lstrip(".") + ": in the schema, not in values.yaml" for k in props if k not in values
        ]
    return problems


def test_schema_covers_exactly_the_values_and_rejects_unknown_keys() -> None:
    assert _compare(VALUES, SCHEMA, "") == []


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"replicas": 2}, "replicas"),
        ({"image": {"tagg": "1.0"}}, "tagg"),
        ({"securityContext": {"runAsNonroot": True}}, "runAsNonroot"),
        ({"replicaCount": "2"}, "replicaCount"),
        ({"watchNamespaces": ["Team_A"]}, "watchNamespaces"),
        ({"image": {"digest": "latest"}}, "digest"),
        ({"stageDefaults": {"resources": {"memory": "lots"}}}, "memory"),
        ({"metrics": {"serviceMonitor": {"enabled": True, "intervall": "1m"}}}, "intervall"),
        ({"runPolicy": {"allowedImages": ["x/"]}}, "allowedImages"),
        ({"runPolicy": {"validationActions": ["Refuse"]}}, "validationActions"),
    ],
)
def test_schema_rejects_bad_values(helm: Helm, values: dict[str, Any], complaint: str) -> None:
    proc = helm.template_text(values, check=False)
    assert proc.returncode != 0, f"{values} was accepted"
    assert complaint in proc.stderr, proc.stderr


def test_settings_that_cannot_work_together_fail(helm: Helm) -> None:
    proc = helm.template_text({"replicaCount": 2, "leaderElection": {"enabled": False}}, check=False)
    assert proc.returncode != 0 and "leaderElection" in proc.stderr
    proc = helm.template_text({"serviceAccount": {"create": False}}, check=False)
    assert proc.returncode != 0 and "serviceAccount.name" in proc.stderr
    proc = helm("template", "x", str(CHART), "--kube-version", "1.28.9", check=False)
    assert proc.returncode != 0 and "needs 1.29 or newer" in proc.stderr
    proc = helm.template_text(
        {"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}}, check=False
    )
    assert proc.returncode != 0 and "metrics.service.enabled" in proc.stderr


@pytest.mark.parametrize("name", list(value_sets()))
def test_lint(helm: Helm, name: str) -> None:
    proc = helm("lint", "--strict", str(CHART), "-f", str(helm.values_file(value_sets()[name], name)))
    assert "0 chart(s) failed" in proc.stdout


def test_chart_crd_is_the_generated_crd(helm: Helm) -> None:
    assert "charts/rlhf-operator/templates/crd-rlhfruns.yaml" in GENERATED  # kept fresh by `make verify`
    rendered = by_kind(helm.template({}), "CustomResourceDefinition")
    source = yaml.safe_load((REPO / "crds" / "rlhfruns.rlhf-operator.io.yaml").read_text())
    assert len(rendered) == 1
    assert rendered[0]["spec"] == source["spec"]
    assert rendered[0]["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    dropped = by_kind(helm.template({"crds": {"keep": False}}), "CustomResourceDefinition")
    assert "annotations" not in dropped[0]["metadata"]
    assert by_kind(helm.template({"crds": {"enabled": False}}), "CustomResourceDefinition") == []


def _container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = by_kind(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_defaults_are_secure_and_single_active(helm: Helm) -> None:
    docs = helm.template({})
    (deployment,) = by_kind(docs, "Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    container = _container(docs)
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["limits"]["memory"] and container["resources"]["requests"]["cpu"]
    assert "--lease-name=rlhf-operator" in container["args"]
    assert not any(a.startswith("--namespace") for a in container["args"])
    assert "--progress-interval=10" in container["args"]  # live progress: one log read per stage per 10 s
    assert container["image"] == "ghcr.io/rlhf-operator/rlhf-operator:0.1.0"
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        [
            "CustomResourceDefinition",
            "ServiceAccount",
            "Service",
            "Deployment",
            "ClusterRole",
            "ClusterRole",
            "ClusterRoleBinding",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        ]
    )
    (sa,) = by_kind(docs, "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False and pod["automountServiceAccountToken"] is True


def test_scoped_install_has_no_cluster_wide_namespaced_rights(helm: Helm) -> None:
    docs = helm.template(value_sets()["scoped"])
    roles = by_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["rlhf-system", "team-a", "team-b"]
    (cluster_role,) = by_kind(docs, "ClusterRole")  # the CRD reader only
    assert cluster_role["rules"] == [
        {
            "apiGroups": ["apiextensions.k8s.io"],
            "resources": ["customresourcedefinitions"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    args = _container(docs)["args"]
    assert [a for a in args if a.startswith("--namespace")] == ["--namespace=team-a", "--namespace=team-b"]


def test_ha_and_monitoring(helm: Helm) -> None:
    docs = helm.template(value_sets()["ha-monitored"])
    (deployment,) = by_kind(docs, "Deployment")
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    container = _container(docs)
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"  # standbys count as available
    assert container["image"].endswith("@sha256:" + "0" * 63 + "1")
    assert "--progress-interval=5" in container["args"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RLHF_DEFAULT_STORAGE_CLASS"] == "fast-rwo" and env["RLHF_DEFAULT_STAGE_MEMORY"] == "64Gi"
    (monitor,) = by_kind(docs, "ServiceMonitor")
    (service,) = by_kind(docs, "Service")
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert all(d["metadata"]["labels"]["team"] == "ml-platform" for d in docs)


def test_bring_your_own_rbac_and_service_account(helm: Helm) -> None:
    docs = helm.template(value_sets()["bring-your-own"])
    assert sorted(d["kind"] for d in docs) == ["CustomResourceDefinition", "Deployment"]
    (deployment,) = by_kind(docs, "Deployment")
    assert deployment["metadata"]["name"] == "rlhf"
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "existing-operator"
    assert "--no-leader-election" in _container(docs)["args"]
