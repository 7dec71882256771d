"""End to end as the operator's own identity with nothing but the chart's RBAC: the operator process
runs with the exact arguments and environment the chart's Deployment gives it, as
system:serviceaccount:rlhf-system:rlhf-operator (the control plane's operator token), and takes the
tiny pipeline (fast fake stages, run by the local kubelet as Job controller and kubelet) to Succeeded.
Then the GitOps contract: re-applying the unchanged manifest server-side changes nothing and
restarts nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from rlhf_operator.dev.controlplane import User, free_port
from tests.chart.tools import argocd_health, by_kind
from tests.operator.harness import Env, Process, http_get, tiny_run
from tests.pythonpath import python_env

from .conftest import OTHER, SCOPED, WATCHED, Installed

pytestmark = pytest.mark.controlplane
FIELD_MANAGER = "argocd-controller"  # as Argo CD's server-side apply names itself

LOG_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


def chart_container(
    installed: Installed, release: str = "rlhf-operator", namespace: str = "rlhf-system"
) -> dict[str, Any]:
    """The operator container exactly as the installed release's Deployment defines it."""
    manifest = installed.helm(
        "get", "manifest", release, "-n", namespace, kubeconfig=installed.plane.kubeconfig()
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


def start_operator_as_the_chart_does(
    installed: Installed,
    env: Env,
    release: str = "rlhf-operator",
    namespace: str = "rlhf-system",
    user: User | None = None,
    extra_args: tuple[str, ...] = (),
) -> tuple[Process, int]:
    container = chart_container(installed, release, namespace)
    port = free_port()
    # The image's ENTRYPOINT (python -m rlhf_operator), the chart's args, then what only differs
    # outside a pod: the API server address (in-cluster config there) and the probe port.
    argv = [
        sys.executable,
        "-m",
        "rlhf_operator",
        *container["args"],
        "--kubeconfig",
        str(installed.plane.kubeconfig(user or installed.plane.operator)),
        "--health-host",
        "127.0.0.1",
        "--health-port",
        str(port),
        "--resync",
        "2",
        *extra_args,
    ]
    process_env = python_env()  # the image's PYTHONPATH
    process_env.update({"POD_NAME": f"{release}-7d9f8-abcde", "POD_NAMESPACE": namespace})
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
    world.start_kubelet()
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
    world.wait_events("tiny", "RunSucceeded")  # events trail the status a moment (their own queue): all posted
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


def rlhfrun_watches(installed: Installed) -> int:
    """Open WATCH requests on rlhfruns in one namespace, as the API server itself counts them: evidence
    that owes nothing to the operator's own idea of its readiness.

    Namespace-scoped only: kube-controller-manager's garbage collector opens a cluster-wide watch on
    every resource it discovers, rlhfruns included, up to 30 s after the CRD is installed (its discovery
    resync) and for good; counting it made the wait for "no watch" below time out whenever the tests
    before took longer than that (a loaded CI machine). The scoped operator watches its namespaces."""
    metrics = installed.plane.kubectl("get", "--raw", "/metrics")
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in metrics.splitlines()
        if line.startswith("apiserver_longrunning_requests{")
        and 'resource="rlhfruns"' in line
        and 'scope="namespace"' in line
        and 'verb="WATCH"' in line
    )


def scoped_user(installed: Installed) -> tuple[User, str]:
    """The scoped release's own ServiceAccount, with a real token from the API server."""
    _, sa_namespace, sa_name = SCOPED.rsplit(":", 2)
    token = installed.plane.kubectl("create", "token", sa_name, "-n", sa_namespace).strip()
    return User(SCOPED, token, ("system:serviceaccounts", f"system:serviceaccounts:{sa_namespace}")), sa_namespace


def test_namespace_scoped_operator_is_ready_only_once_its_watches_are_open(
    installed: Installed, tmp_path: Path
) -> None:
    """The scoped release (watchNamespaces=team-a,team-b) as its own ServiceAccount: its Role grants
    nothing cluster-wide, so kopf must not try to list namespaces or watch CRDs (a 403 there was
    retried through the error backoffs for ~20 s before any watch opened, while /readyz said 200)."""
    namespace = WATCHED[0]
    env = Env(installed.plane, namespace, tmp_path)
    try:
        user, sa_namespace = scoped_user(installed)
        # Nothing else watches runs in one namespace, so the count below is ours. The operator of the test
        # before exited at its end; the API server counts its watches until it sees their connections close.
        env.wait_for("no watch on rlhfruns", lambda: rlhfrun_watches(installed) == 0, timeout=60, every=0.2)
        started = time.monotonic()
        operator, port = start_operator_as_the_chart_does(installed, env, "scoped", sa_namespace, user)
        codes: list[int] = []
        while time.monotonic() - started < 90:
            code, _ = http_get(port, "/readyz")
            codes.append(code)
            if code == 200:
                break
            assert operator.alive(), operator.text()
            time.sleep(0.05)
        ready_after = time.monotonic() - started
        assert codes[-1] == 200, f"/readyz never turned 200 in 90s:\n{operator.text()[-4000:]}"
        assert 503 in codes, f"/readyz answered {sorted(set(codes))} before 200, never 503 (starting)"
        env.wait_for(
            "the API server to hold the operator's watches on rlhfruns",
            lambda: rlhfrun_watches(installed) >= len(WATCHED),
            timeout=60,
            every=0.2,
        )
        watching_after = time.monotonic() - started
        print(f"scoped operator: /readyz 200 after {ready_after:.1f}s, rlhfruns watched after {watching_after:.1f}s")
        # Ready means watching: the API server holds a watch on runs in each watched namespace by
        # then (a moment's grace for the WATCH that follows the initial LIST), not 20 s later.
        assert watching_after - ready_after < 3, "/readyz said ready long before the watches opened"
        assert watching_after < 15, f"the watches took {watching_after:.1f}s to open: a backoff before them?"

        env.start_kubelet()
        env.apply(tiny_run())
        run = env.wait_phase("tiny", "Succeeded", timeout=120)
        assert [s["phase"] for s in run["status"]["stages"]] == ["Succeeded"] * 4
        assert operator.alive()
        # The log's own timestamp is left out: its milliseconds can read 403 (",403" failed a CI run).
        refused = [
            line
            for line in operator.text().splitlines()
            if any(word in LOG_TIMESTAMP.sub("", line) for word in ("403", "Forbidden", "Not enough permissions"))
        ]
        assert refused == [], "the scoped operator was refused something:\n" + "\n".join(refused)
    finally:
        env.stop_all()


def test_a_watch_that_cannot_open_keeps_the_operator_unready(installed: Installed, tmp_path: Path) -> None:
    """The readiness gate itself: told to watch one more namespace than its Role covers, the scoped
    operator leads and watches team-a and team-b, but the refused LIST in the third keeps it unready."""
    env = Env(installed.plane, WATCHED[0], tmp_path)
    try:
        user, sa_namespace = scoped_user(installed)
        operator, port = start_operator_as_the_chart_does(
            installed, env, "scoped", sa_namespace, user, extra_args=("--namespace", OTHER)
        )
        env.wait_for(
            f"the LIST of runs in {OTHER} to be refused",
            lambda: f"/namespaces/{OTHER}/rlhfruns" in operator.text() and "Forbidden" in operator.text(),
            timeout=30,
        )
        env.wait_for("the other watches to open", lambda: rlhfrun_watches(installed) >= len(WATCHED), timeout=10)
        codes = []
        for _ in range(20):
            code, body = http_get(port, "/readyz")
            codes.append((code, body))
            time.sleep(0.25)
        assert operator.alive()
        assert set(codes) == {(503, "starting\n")}, codes
    finally:
        env.stop_all()
