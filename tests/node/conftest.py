"""The node tier: a real single-node cluster (rlhf_operator.dev.cluster), the images built from
images/, the chart installed with Helm, and runs applied with kubectl, as a platform team would.

One cluster and one release serve the whole tier (package scope: they stop when the tier ends, so
the rest of the suite does not share the cores with an idle cluster); each test works in its own
namespace with its own workspace volume.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlhf_operator.dev import cluster as node_cluster
from tests.chart.tools import CHART, Helm
from tests.kueue import manager as kueue_manager

from .kube import NodeEnv, split_image

RELEASE_NAMESPACE = "rlhf-system"


@pytest.fixture(scope="package")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[node_cluster.Cluster]:
    started = time.monotonic()
    with node_cluster.running(tmp_path_factory.mktemp("node")) as running:
        print(f"\nnode cluster ready in {time.monotonic() - started:.0f} s (images: {dict(running.images)})")
        yield running


@pytest.fixture(scope="package")
def release(cluster: node_cluster.Cluster, tmp_path_factory: pytest.TempPathFactory) -> str:
    """`helm install` of the chart with the images built here; returns the operator's Deployment name."""
    helm = Helm(tmp_path_factory.mktemp("helm"))
    operator_repo, operator_tag = split_image(cluster.images["operator"])
    stages_repo, stages_tag = split_image(cluster.images["stages"])
    values = {
        "image": {"repository": operator_repo, "tag": operator_tag, "pullPolicy": "IfNotPresent"},
        "stageDefaults": {"image": {"repository": stages_repo, "tag": stages_tag}},
        # Live progress read every 3 s instead of 10: the tests wait on PPO's step.
        "operator": {"verbose": True, "progressIntervalSeconds": 3},
    }
    helm(
        "install", "rlhf-operator", str(CHART), "--namespace", RELEASE_NAMESPACE, "--create-namespace",
        "-f", str(helm.values_file(values)), "--wait", "--timeout", "5m",
        kubeconfig=cluster.plane.kubeconfig(),
    )  # fmt: skip
    deployment = json.loads(cluster.kubectl("-n", RELEASE_NAMESPACE, "get", "deploy", "-o", "json"))["items"][0]
    return str(deployment["metadata"]["name"])


@pytest.fixture(scope="package")
def tiny_assets(cluster: node_cluster.Cluster, release: str) -> Path:
    """The tiny assets, built once for the tier by a Job in the stage image (NodeEnv.tiny_assets) in a
    namespace of their own; tests take a copy with ``env.workspace(name, assets=tiny_assets)``."""
    node_env = NodeEnv(cluster, "n-tiny-assets", RELEASE_NAMESPACE, release)
    cluster.kubectl("create", "namespace", node_env.namespace)
    return node_env.tiny_assets(node_env.workspace("assets"))


@pytest.fixture
def env(cluster: node_cluster.Cluster, release: str, request: pytest.FixtureRequest) -> Iterator[NodeEnv]:
    prefix = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    namespace = f"n-{prefix}-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", namespace)
    node_env = NodeEnv(cluster, namespace, RELEASE_NAMESPACE, release)
    yield node_env
    # A run left behind would keep training on the node's two cores through the next test.
    node_env.delete_runs()


@pytest.fixture(scope="package")
def kueue(cluster: node_cluster.Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[kueue_manager.Kueue]:
    """Kueue's CRDs and manager on the node (tests/kueue): only the Kueue tests ask for it."""
    started = time.monotonic()
    with kueue_manager.running(cluster, tmp_path_factory.mktemp("kueue")) as running:
        print(f"\nKueue {running.version} ready in {time.monotonic() - started:.0f} s")
        yield running
