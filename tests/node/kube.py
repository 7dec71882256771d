"""Helpers for the node tier: a test's namespace on the real node, and waits with readable failures."""

from __future__ import annotations

import copy
import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rlhf_api.runtime import WORKSPACE_MOUNT_PATH
from rlhf_operator.dev.cluster import Cluster

REPO = Path(__file__).resolve().parents[2]
STAGE_UID = 1000  # the stage image's user (images/stages/Dockerfile)


def split_image(ref: str) -> tuple[str, str]:
    """``localhost/rlhf-stages:abc`` -> (``localhost/rlhf-stages``, ``abc``)."""
    repository, _, tag = ref.rpartition(":")
    assert "/" not in tag, ref
    return repository, tag


def tiny_run(name: str, claim: str, **spec: Any) -> dict[str, Any]:
    """examples/tiny.yaml as a user applies it, on a workspace volume that already holds its assets."""
    run = yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text())
    run = copy.deepcopy(run)
    run["metadata"]["name"] = name
    run["spec"]["storage"] = {"existingClaim": claim}
    # One torch thread per stage process, as a platform team sets for stages that share a node's
    # cores (tiny.yaml sets no CPU limit, so torch would size its pool by the node's 2 cores).
    # Here the node shares those cores with the other test processes of tests/run_suite.py: a
    # tiny training step with 2 threads under that load took 2.4x the CPU of 1 thread and was
    # slower too (benchmarks/thread_oversubscription.py).
    run["spec"]["podTemplate"] = {"env": [{"name": "OMP_NUM_THREADS", "value": "1"}]}
    for key, value in spec.items():
        run["spec"][key] = value
    return run


def sft_only_run(name: str, claim: str, steps: int, **runtime: Any) -> dict[str, Any]:
    """tiny.yaml with its SFT stage only, ``steps`` long with a checkpoint every 20 steps: for the tests
    that stop a stage mid-way (suspend, preemption) and see it resume from its checkpoint, without
    the three stages after it, which they would only wait for."""
    run = tiny_run(name, claim)
    spec = run["spec"]
    for stage in ("reward", "ppo", "merge"):
        spec[stage]["enabled"] = False
    spec["sft"]["training"].update(maxSteps=steps, saveSteps=20)
    spec["runtime"] = {"backoffLimit": 1, **runtime}
    return run


@dataclass
class NodeEnv:
    """One test's namespace on the node cluster, with the operator released in ``operator_namespace``."""

    cluster: Cluster
    namespace: str
    operator_namespace: str
    operator_deployment: str

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> str:
        return self.cluster.kubectl("-n", self.namespace, *args, check=check, input=input)

    def apply(self, manifest: dict[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", input=json.dumps(manifest))

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        out = self.kubectl("get", kind, name, "-o", "json", "--ignore-not-found", check=False)
        return json.loads(out) if out.strip().startswith("{") else None

    def items(self, kind: str, selector: str = "") -> list[dict[str, Any]]:
        args = ["get", kind, "-o", "json"] + (["-l", selector] if selector else [])
        return list(json.loads(self.kubectl(*args))["items"])

    def run(self, name: str) -> dict[str, Any]:
        run = self.get("rlhfrun", name)
        assert run is not None, f"RLHFRun {name} not found"
        return run

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float, interval: float = 1.0) -> Any:
        """Polls ``check`` until it returns something truthy; fails with the namespace's state."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout:.0f} s\n{self.describe()}")
            time.sleep(interval)

    def wait_run(self, name: str, check: Callable[[dict[str, Any]], bool], what: str, timeout: float) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            run = self.get("rlhfrun", name)
            return run if run is not None and check(run) else None

        result: dict[str, Any] = self.wait_for(f"run {name}: {what}", probe, timeout)
        return result

    def wait_phase(self, name: str, phase: str, timeout: float) -> dict[str, Any]:
        return self.wait_run(name, lambda r: r.get("status", {}).get("phase") == phase, f"phase {phase}", timeout)

    def workspace(self, name: str, size: str = "5Gi", assets: Path | None = None) -> str:
        """A ReadWriteOnce claim on the node's local volumes; with ``assets`` (the ``tiny_assets``
        fixture's folder), one that already holds a copy of them under ``assets/``."""
        spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}
        if assets is not None:
            spec["volumeName"] = self._volume_with(assets, claim=name)
        self.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name}, "spec": spec})
        if assets is not None:
            # A Pod scheduled before the PV controller binds the claim is parked as unschedulable
            # ("unbound immediate PersistentVolumeClaims") and may wait minutes for its next try.
            def bound() -> bool:
                return ((self.get("pvc", name) or {}).get("status") or {}).get("phase") == "Bound"

            self.wait_for(f"claim {name} bound", bound, 60, interval=0.5)
        return name

    def _volume_with(self, assets: Path, claim: str) -> str:
        """Reserves a free local volume for ``claim`` and copies ``assets`` onto it from the host.

        Why not a Job per test: building the assets in the stage image costs a Pod start and the
        imports of the training stack, in each of seven tests; the node tests that take
        a copy are about what happens to a stage, and test_pipeline still builds them as a user
        does. The volume is reserved (claimRef) before the copy, so no other claim can bind it."""
        free = [
            pv
            for pv in json.loads(self.cluster.kubectl("get", "pv", "-o", "json"))["items"]
            if pv["status"].get("phase") == "Available" and not pv["spec"].get("claimRef")
        ]
        assert free, "no free local volume on the node (Cluster.add_volumes)"
        volume = min(free, key=lambda pv: str(pv["metadata"]["name"]))
        ref = {
            "claimRef": {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "namespace": self.namespace,
                "name": claim,
            }
        }
        self.cluster.kubectl("patch", "pv", volume["metadata"]["name"], "--type=merge", "-p", json.dumps({"spec": ref}))
        # -a keeps the stage user's ownership the Job gave the files (the Pods' fsGroup).
        subprocess.run(["cp", "-a", str(assets), volume["spec"]["local"]["path"]], check=True)
        return str(volume["metadata"]["name"])

    def tool_job(self, name: str, claim: str, command: list[str], timeout: float = 300) -> dict[str, Any]:
        """Runs ``command`` in the stage image against the workspace claim, as a Job; waits for it."""
        self.apply(
            {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": {"name": name},
                "spec": {
                    "backoffLimit": 0,
                    "template": {
                        "spec": {
                            "restartPolicy": "Never",
                            "automountServiceAccountToken": False,
                            "securityContext": {
                                "runAsNonRoot": True,
                                "runAsUser": STAGE_UID,
                                "runAsGroup": STAGE_UID,
                                "fsGroup": STAGE_UID,
                            },
                            "containers": [
                                {
                                    "name": "tool",
                                    "image": self.cluster.images["stages"],
                                    "imagePullPolicy": "IfNotPresent",
                                    "command": command,
                                    "securityContext": {
                                        "readOnlyRootFilesystem": True,
                                        "allowPrivilegeEscalation": False,
                                    },
                                    "volumeMounts": [
                                        {"name": "workspace", "mountPath": WORKSPACE_MOUNT_PATH},
                                        {"name": "tmp", "mountPath": "/tmp"},
                                    ],
                                }
                            ],
                            "volumes": [
                                {"name": "workspace", "persistentVolumeClaim": {"claimName": claim}},
                                {"name": "tmp", "emptyDir": {}},
                            ],
                        }
                    },
                },
            }
        )

        def finished() -> dict[str, Any] | None:
            job = self.get("job", name)
            conditions = {c["type"]: c["status"] for c in (job or {}).get("status", {}).get("conditions", [])}
            return job if conditions.get("Complete") == "True" or conditions.get("Failed") == "True" else None

        job: dict[str, Any] = self.wait_for(f"Job {name} finished", finished, timeout)
        succeeded = job["status"].get("succeeded", 0) == 1
        assert succeeded, f"Job {name} failed:\n{self.kubectl('logs', f'job/{name}', check=False)}"
        return job

    def tiny_assets(self, claim: str) -> Path:
        """The tiny model, tokenizer and data, written onto the claim by a Job in the stage image, as
        a user does; returns where they lie on this host (the claim's local volume)."""
        out = f"{WORKSPACE_MOUNT_PATH}/assets"
        self.tool_job("tiny-assets", claim, ["python", "-m", "rlhf_stages.tiny", "--out", out])
        pvc = self.get("pvc", claim)
        assert pvc is not None and pvc["spec"].get("volumeName"), pvc
        pv = json.loads(self.cluster.kubectl("get", "pv", pvc["spec"]["volumeName"], "-o", "json"))
        return Path(pv["spec"]["local"]["path"]) / "assets"

    def operator_pods(self) -> list[dict[str, Any]]:
        out = self.cluster.kubectl(
            "-n", self.operator_namespace, "get", "pods", "-l", "app.kubernetes.io/name=rlhf-operator", "-o", "json"
        )
        return list(json.loads(out)["items"])

    def describe(self) -> str:
        """What a person would look at: runs, Jobs, Pods, events, and the operator's log tail."""
        parts = [
            self.kubectl("get", "rlhfrun,jobs,pods,pvc", "-o", "wide", check=False),
            self.kubectl("get", "rlhfrun", "-o", "jsonpath={.items[*].status}", check=False)[-3000:],
            self.kubectl("get", "events", "--sort-by=.lastTimestamp", check=False)[-3000:],
            self.cluster.kubectl(
                "-n", self.operator_namespace, "logs", f"deploy/{self.operator_deployment}", "--tail=40", check=False
            ),
        ]
        return "\n".join(parts)

    def delete_runs(self) -> None:
        self.kubectl("delete", "rlhfrun", "--all", "--wait=false", check=False)
