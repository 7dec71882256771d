"""helm install, upgrade and uninstall against a real API server of their own (a private control
plane: the CRD's whole lifecycle is under test, which the shared session plane cannot give up).

What uninstall leaves behind is exactly what docs/install.md says: the release namespace (Helm never
deletes one), and with crds.keep the CRD and the runs in it; with crds.keep=false nothing at all."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import yaml

from rlhf_operator.dev import controlplane
from rlhf_operator.dev.controlplane import ControlPlane

from .tools import CHART, REPO, Helm, stop_quickly, wait_established

pytestmark = pytest.mark.controlplane
CRD = "rlhfruns.rlhf-operator.io"
# Objects the API server itself creates and updates on its own (heartbeats, identity leases).
CHURN = {"events", "events.events.k8s.io", "leases.coordination.k8s.io"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = controlplane.start(tmp_path_factory.mktemp("chart-install"))
    try:
        yield plane
    finally:
        stop_quickly(plane)


def inventory(plane: ControlPlane) -> set[str]:
    """Every object of every listable type in the cluster, as kind/namespace/name."""
    types = [t for t in plane.kubectl("api-resources", "--verbs=list", "-o", "name").split() if t not in CHURN]
    out = plane.kubectl(
        "get",
        ",".join(types),
        "-A",
        "--no-headers",
        "-o",
        "custom-columns=KIND:.kind,NS:.metadata.namespace,NAME:.metadata.name",
    )
    return {"/".join(line.split()).replace("<none>", "") for line in out.splitlines() if line.strip()}


def wait_gone(plane: ControlPlane, *what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while plane.kubectl("get", *what, "--ignore-not-found", "-o", "name").strip():
        assert time.monotonic() < deadline, f"{what} still there after {timeout}s"
        time.sleep(0.5)


def run_manifest() -> str:
    run = yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text())
    return yaml.safe_dump(run)


def test_install_upgrade_uninstall_keeps_only_what_is_documented(cluster: ControlPlane, helm: Helm) -> None:
    before = inventory(cluster)
    kubeconfig = cluster.kubeconfig()
    install = ("rlhf-operator", str(CHART), "--namespace", "rlhf-system")

    # Install: all namespaces, CRD from the chart.
    helm("install", *install, "--create-namespace", kubeconfig=kubeconfig)
    wait_established(cluster)
    assert cluster.kubectl("get", "deployment,serviceaccount,service", "-n", "rlhf-system", "-o", "name").split() == [
        "deployment.apps/rlhf-operator",
        "serviceaccount/rlhf-operator",
        "service/rlhf-operator-metrics",
    ]
    cluster.kubectl("get", "clusterrole/rlhf-operator", "clusterrolebinding/rlhf-operator")
    cluster.kubectl("create", "namespace", "ml")
    cluster.kubectl("apply", "-n", "ml", "-f", "-", input=run_manifest())  # a user's run: the CRD works

    # Upgrade to a scoped install: the cluster-wide role goes, a Role in the watched namespace comes.
    helm("upgrade", *install, "--set", "watchNamespaces={ml}", kubeconfig=kubeconfig)
    assert not cluster.kubectl("get", "clusterrole/rlhf-operator", "--ignore-not-found", "-o", "name").strip()
    cluster.kubectl("get", "-n", "ml", "role/rlhf-operator", "rolebinding/rlhf-operator")
    args = yaml.safe_load(cluster.kubectl("get", "-n", "rlhf-system", "deployment/rlhf-operator", "-o", "yaml"))
    assert "--namespace=ml" in args["spec"]["template"]["spec"]["containers"][0]["args"]

    # Uninstall (crds.keep is the default): the CRD and the user's run stay, nothing else does.
    helm("uninstall", "rlhf-operator", "--namespace", "rlhf-system", "--wait", kubeconfig=kubeconfig)
    wait_gone(cluster, "-n", "rlhf-system", "deployment/rlhf-operator")
    left = inventory(cluster) - before
    assert left == {
        "Namespace//rlhf-system",
        "Namespace//ml",
        f"CustomResourceDefinition//{CRD}",
        "RLHFRun/ml/tiny",
        "APIService//v1alpha1.rlhf-operator.io",  # the API server's own registration of the CRD's group
    }, left

    # Reinstalling adopts the kept CRD (its Helm ownership annotations still name the release).
    helm("install", *install, "--set", "crds.keep=false", kubeconfig=kubeconfig)
    assert cluster.kubectl("get", "rlhfrun", "-n", "ml", "-o", "name").strip() == "rlhfrun.rlhf-operator.io/tiny"
    crd = yaml.safe_load(cluster.kubectl("get", f"crd/{CRD}", "-o", "yaml"))
    assert "helm.sh/resource-policy" not in (crd["metadata"].get("annotations") or {})

    # Uninstall with crds.keep=false: the CRD goes, and with it every run; only namespaces remain.
    helm("uninstall", "rlhf-operator", "--namespace", "rlhf-system", "--wait", kubeconfig=kubeconfig)
    wait_gone(cluster, f"crd/{CRD}", "apiservice/v1alpha1.rlhf-operator.io")
    left = inventory(cluster) - before
    assert left == {"Namespace//rlhf-system", "Namespace//ml"}, left
