"""Kueue objects for the node tier's tests: one ClusterQueue per test namespace, a LocalQueue in it."""

from __future__ import annotations

import json
from typing import Any

from .kube import NodeEnv

KUEUE_API = "kueue.x-k8s.io/v1beta2"
FLAVOR = "default-flavor"
QUEUE = "lq"
HIGH = "rlhf-test-high"
"""A WorkloadPriorityClass above the runs' (none), for the preemption test."""


def cluster_queue_name(env: NodeEnv) -> str:
    return f"cq-{env.namespace}"[:63]


def apply_cluster_queue(env: NodeEnv, memory: str) -> str:
    """A ClusterQueue admitting only the test's namespace, with ``memory`` of quota (the stage Pods
    request memory, so the quota says how many fit at once); preempts lower priorities."""
    name = cluster_queue_name(env)
    quota = [{"name": "cpu", "nominalQuota": "8"}, {"name": "memory", "nominalQuota": memory}]
    docs: list[dict[str, Any]] = [
        {"apiVersion": KUEUE_API, "kind": "ResourceFlavor", "metadata": {"name": FLAVOR}},
        {"apiVersion": KUEUE_API, "kind": "WorkloadPriorityClass", "metadata": {"name": HIGH}, "value": 1000},
        {
            "apiVersion": KUEUE_API,
            "kind": "ClusterQueue",
            "metadata": {"name": name},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": env.namespace}},
                "preemption": {"withinClusterQueue": "LowerPriority"},
                "resourceGroups": [
                    {"coveredResources": ["cpu", "memory"], "flavors": [{"name": FLAVOR, "resources": quota}]}
                ],
            },
        },
    ]
    env.cluster.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs))
    return name


def delete_cluster_queue(env: NodeEnv) -> None:
    env.cluster.kubectl("delete", "clusterqueue", cluster_queue_name(env), "--wait=false", check=False)


def apply_local_queue(env: NodeEnv, cluster_queue: str) -> None:
    env.apply(
        {
            "apiVersion": KUEUE_API,
            "kind": "LocalQueue",
            "metadata": {"name": QUEUE},
            "spec": {"clusterQueue": cluster_queue},
        }
    )
