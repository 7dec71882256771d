"""End to end as the operator's own identity with nothing but the chart's RBAC: the operator process
runs with the exact arguments and environment the chart's Deployment gives it, as
system:serviceaccount:rlhf-system:rlhf-operator (the control plane's operator token), and takes the
tiny pipeline (fast fake stages, run by the dev executor as Job controller and kubelet) to Succeeded.
Then the GitOps contract: re-applying the unchanged manifest server-side changes nothing and
restarts nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from rlhf_operator.dev.controlplane import free_port
from tests.chart.tools import argocd_health, by_kind
from tests.operator.harness import Env, Process, tiny_run
from tests.pythonpath import python_env

from .conftest import Installed

pytestmark = pytest.mark.controlplane
FIELD_MANAGER = "argocd-controller"  # as Argo CD's server-side apply names itself


def chart_container(installed: Installed) -> dict[str, Any]:
    """The operator container exactly as the installed release's Deployment defines it."""
    manifest = installed.helm(
        "get", "manifest", "rlhf-operator", "-n", "rlhf-system", kubeconfig=installed.plane.kubeconfig()
    ).stdout
    (deployment,) = by_kind([d for d in yaml.safe_load_all(manifest) if d], "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


@pytest.fixture
def world(installed: Installed, tmp_path: Path) -> Iterator[Env]:
    installed.plane.kubectl("create", "namespace", "e2e")
    env = Env(installed.plane, "e2e", tmp_path)
    try:
        yield env
    finally:
        env.stop_all()


def start_operator_as_the_chart_does(installed: Installed, env: Env) -> tuple[Process, int]:
    container = chart_container(installed)
    port = free_port()
    # The image's ENTRYPOINT (python -m rlhf_operator), the chart's args, then what only differs
    # outside a pod: the API server address (in-cluster config there) and the probe port.
    argv = [
        sys.executable,
        "-m",
        "rlhf_operator",
        *container["args"],
        "--kubeconfig",
        str(installed.plane.kubeconfig(installed.plane.operator)),
        "--health-host",
        "127.0.0.1",
        "--health-port",
        str(port),
        "--resync",
        "2",
    ]
    process_env = python_env()  # the image's PYTHONPATH
    process_env.update({"POD_NAME": "rlhf-operator-7d9f8-abcde", "POD_NAMESPACE": "rlhf-system"})
    process_env.update({e["name"]: e["value"] for e in container["env"] if "value" in e})
    log = env.root / "operator.log"
    proc = Process(subprocess.Popen(argv, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=process_env), log)
    env.processes.append(proc)
    return proc, port


def ssa(env: Env, manifest: dict[str, Any]) -> str:
    return env.kubectl(
        "apply", "--server-side", f"--field-manager={FIELD_MANAGER}", "-f", "-", input=yaml.safe_dump(manifest)
    )


def test_tiny_pipeline_as_the_operator_identity_with_only_the_chart_rbac(installed: Installed, world: Env) -> None:
    world.start_executor()
    operator, _ = start_operator_as_the_chart_does(installed, world)
    manifest = tiny_run()
    ssa(world, manifest)
    run = world.wait_phase("tiny", "Succeeded", timeout=120)
    assert [s["phase"] for s in run["status"]["stages"]] == ["Succeeded"] * 4
    assert argocd_health(run)["status"] == "Healthy"  # the Argo CD health check on a real operator status
    assert operator.alive()
    forbidden = [line for line in operator.text().splitlines() if "403" in line or "Forbidden" in line]
    assert forbidden == [], "the operator was refused something the chart does not grant:\n" + "\n".join(forbidden)
    lease = json.loads(installed.plane.kubectl("get", "lease", "rlhf-operator", "-n", "rlhf-system", "-o", "json"))
    assert lease["spec"]["holderIdentity"] == "rlhf-operator-7d9f8-abcde"

    # GitOps: the same manifest applied again server-side is a no-op for the run, its Jobs and stages.
    jobs = {j["metadata"]["name"]: j["metadata"]["uid"] for j in world.items("jobs")}
    version, generation = run["metadata"]["resourceVersion"], run["metadata"]["generation"]
    starts, events = world.starts("tiny"), len(world.items("events"))
    ssa(world, manifest)
    time.sleep(5)  # two resync periods of the operator
    again = world.run("tiny")
    assert (again["metadata"]["resourceVersion"], again["metadata"]["generation"]) == (version, generation)
    assert {j["metadata"]["name"]: j["metadata"]["uid"] for j in world.items("jobs")} == jobs
    assert world.starts("tiny") == starts == ["sft 0", "reward 0", "ppo 0", "merge 0"]
    assert len(world.items("events")) == events
    diff = subprocess.run(
        [
            str(installed.plane.bin_dir / "kubectl"),
            "--kubeconfig",
            str(installed.plane.kubeconfig()),
            "-n",
            "e2e",
            "diff",
            "--server-side",
            f"--field-manager={FIELD_MANAGER}",
            "-f",
            "-",
        ],
        check=False,
        input=yaml.safe_dump(manifest),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert diff.returncode == 0, diff.stdout + diff.stderr
