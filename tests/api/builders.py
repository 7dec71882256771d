"""Small builders for RLHFRun manifests used across tests."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def load_example(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "examples" / name).read_text())


def minimal_run(name: str = "run") -> dict[str, Any]:
    """The smallest valid PPO run."""
    return {
        "apiVersion": "rlhf-operator.io/v1alpha1",
        "kind": "RLHFRun",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"name": "facebook/opt-350m"},
            "sft": {"dataset": {"name": "Open-Orca/OpenOrca"}},
            "reward": {"dataset": {"name": "Anthropic/hh-rlhf"}},
            "ppo": {"dataset": {"name": "Open-Orca/OpenOrca", "columns": {"prompt": "question"}}},
        },
    }


_DELETE = object()


def patched(doc: dict[str, Any], path: str, value: Any = _DELETE) -> dict[str, Any]:
    """A copy of ``doc`` with the dotted ``path`` set to ``value`` (or removed when no value is given)."""
    out = copy.deepcopy(doc)
    *parents, leaf = path.split(".")
    node = out
    for key in parents:
        node = node.setdefault(key, {})
    if value is _DELETE:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return out


def kubectl_create(
    control_plane: Any, namespace: str, doc: dict[str, Any], *extra: str
) -> subprocess.CompletedProcess[str]:
    """``kubectl create -f -`` of one object against the test API server; the caller checks the outcome."""
    command = [str(control_plane.bin_dir / "kubectl"), "--kubeconfig", str(control_plane.kubeconfig())]
    return subprocess.run(
        [*command, "-n", namespace, "create", *extra, "-f", "-"],
        input=json.dumps(doc),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
