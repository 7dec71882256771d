"""Rendered manifests, checked against the real API server: kubeconform with schemas generated from
the server's own OpenAPI, a server-side dry run, Pod Security "restricted", and no perpetual diff
under server-side apply (what Argo CD and Flux do)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from rlhf_api.layout import RunRef
from rlhf_api.run import RLHFRunSpec
from rlhf_operator.children import build_job
from rlhf_operator.dev.controlplane import ControlPlane

from .tools import REPO, Helm, by_kind, kubeconform, server_side_diff, value_sets

pytestmark = pytest.mark.controlplane


def _dump(docs: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


def _namespaces(plane: ControlPlane, namespace: str) -> tuple[str, str, str]:
    """The release namespace and two watched namespaces, created fresh for one value set."""
    names = (f"{namespace}-rel", f"{namespace}-a", f"{namespace}-b")
    for name in names:
        plane.kubectl("create", "namespace", name)
    return names


@pytest.mark.parametrize("name", list(value_sets()))
def test_rendered_objects_are_valid(
    control_plane: ControlPlane, helm: Helm, schemas: Path, namespace: str, name: str
) -> None:
    release_ns, team_a, team_b = _namespaces(control_plane, namespace)
    values = value_sets((team_a, team_b))[name]
    release = f"v{abs(hash(namespace)) % 100000}"  # cluster-scoped names must not clash between value sets
    docs = helm.template(values, release=release, namespace=release_ns)

    proc = kubeconform(schemas, _dump(docs), "-skip", "ServiceMonitor")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    monitors = len(by_kind(docs, "ServiceMonitor"))
    assert f"Valid: {len(docs) - monitors}, Invalid: 0, Errors: 0, Skipped: {monitors}" in proc.stdout, proc.stdout

    # The server's own verdict. The CRD is already installed by the session fixture: dry-run it as an
    # update (conflicts forced: nothing is persisted). The test server has no ServiceMonitor CRD.
    served = [d for d in docs if d["kind"] != "ServiceMonitor"]
    out = control_plane.kubectl(
        "apply",
        "--server-side",
        "--dry-run=server",
        "--force-conflicts",
        "--field-manager=helm-dry-run",
        "-f",
        "-",
        input=_dump(served),
    )
    assert out.count("(server dry run)") == len(served), out


def test_kubeconform_catches_what_the_schema_forbids(schemas: Path, helm: Helm) -> None:
    """The generated schemas are strict: an unknown field or a wrong type fails (the test is not vacuous)."""
    (deployment,) = by_kind(helm.template({}), "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"]["runAsNonroot"] = True
    proc = kubeconform(schemas, _dump([deployment]))
    assert proc.returncode != 0 and "runAsNonroot" in proc.stdout, proc.stdout
    del container["securityContext"]["runAsNonroot"]
    container["ports"][0]["containerPort"] = "http"
    proc = kubeconform(schemas, _dump([deployment]))
    assert proc.returncode != 0 and "containerPort" in proc.stdout, proc.stdout


@pytest.mark.parametrize("name", ["defaults", "ha-monitored"])
def test_operator_pod_meets_pod_security_restricted(
    control_plane: ControlPlane, helm: Helm, namespace: str, name: str
) -> None:
    control_plane.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    (deployment,) = by_kind(helm.template(value_sets()[name], namespace=namespace), "Deployment")
    template = deployment["spec"]["template"]
    # As the ReplicaSet would create it (a system priority class is only admitted in kube-system).
    spec: dict[str, Any] = {k: v for k, v in template["spec"].items() if k != "priorityClassName"}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "operator", "namespace": namespace, "labels": template["metadata"]["labels"]},
        "spec": spec,
    }
    out = control_plane.kubectl("create", "--dry-run=server", "-f", "-", input=yaml.safe_dump(pod))
    assert "created (server dry run)" in out
    # The control: the same pod with a privilege escalation allowed is refused, so PSA is really on.
    spec["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    with pytest.raises(subprocess.CalledProcessError) as refused:
        control_plane.kubectl("create", "--dry-run=server", "-f", "-", input=yaml.safe_dump(pod))
    assert "violates PodSecurity" in refused.value.stderr


@pytest.mark.parametrize("example", ["tiny.yaml", "minimal.yaml"])
def test_stage_pods_meet_pod_security_restricted(control_plane: ControlPlane, namespace: str, example: str) -> None:
    """docs/install.md promises training namespaces can enforce "restricted": the stage pods the
    operator's own builder makes are admitted there."""
    manifest = yaml.safe_load((REPO / "examples" / example).read_text())
    spec = RLHFRunSpec.model_validate(manifest["spec"])
    control_plane.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    job = build_job(RunRef(name=manifest["metadata"]["name"], namespace=namespace, uid="0" * 8), spec, "sft")
    template = job["spec"]["template"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "stage", "namespace": namespace, **template["metadata"]},
        "spec": template["spec"],
    }
    out = control_plane.kubectl("create", "--dry-run=server", "-f", "-", input=yaml.safe_dump(pod))
    assert "created (server dry run)" in out


def test_server_side_apply_of_the_chart_leaves_no_diff(control_plane: ControlPlane, helm: Helm, namespace: str) -> None:
    """Argo CD / Flux apply the rendered chart server-side and then diff: the server's defaults and
    normalisations (quantities, probe defaults, ...) must not show up as a perpetual diff."""
    release = f"ssa{abs(hash(namespace)) % 100000}"
    docs = [d for d in helm.template({"crds": {"enabled": False}}, release=release, namespace=namespace)]
    manifest = _dump(docs)
    # The run policy is cluster-scoped and would judge every later test's runs: removed afterwards.
    policy = [
        f"{d['kind'].lower()}/{d['metadata']['name']}" for d in docs if d["kind"].startswith("ValidatingAdmission")
    ]
    assert len(policy) == 2
    try:
        control_plane.kubectl("apply", "--server-side", "--field-manager=argocd-controller", "-f", "-", input=manifest)
        diff = server_side_diff(control_plane, manifest, "argocd-controller")
        assert diff.returncode == 0, f"perpetual diff:\n{diff.stdout}\n{diff.stderr}"
    finally:
        control_plane.kubectl("delete", "--ignore-not-found", *policy)
