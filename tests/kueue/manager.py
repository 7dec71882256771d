"""Kueue's manager for the node tier: built from its Go module by build.sh, run as a host process
against the node cluster's API server (admin kubeconfig), with only the batch/job integration.

Without its webhooks: no Mutating/ValidatingWebhookConfiguration is registered, so the API server never
calls Kueue's webhook server (it still listens, on a self-signed certificate, because the manager
insists). That is sound for the operator's stage Jobs: Kueue's Job defaulting webhook only suspends a
Job carrying the queue label (the operator creates them suspended, with the label), defaults the
queue label from a namespace's `default` LocalQueue (the operator always sets it) and sets managedBy
for MultiKueue (not used); its validation refuses label and priority changes the operator never makes.
The Kueue objects' own defaults come from the CRDs' schema defaults. A test's own Job for Kueue must be
created suspended, as the webhook would have made it.

Kueue reaches the API server through versionproxy (built beside it), which only rewrites /version: the
test control plane reports "v0.0.0-master+$Format:%H$", which Kueue cannot parse and will not start on.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from rlhf_operator.dev import controlplane
from rlhf_operator.dev.cluster import Cluster

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build.sh"
CONTROLPLANE_GO_MOD = HERE.parent / "controlplane" / "go.mod"
NAMESPACE = "kueue-system"
# The manager reads its metrics serving certificate from this fixed path when it does not manage its
# certificates itself (internalCertManagement off, which needs a Service and webhook configurations).
METRICS_CERTS = Path("/etc/kueue/metrics/certs")


@dataclass
class Kueue:
    process: subprocess.Popen[bytes]
    proxy: subprocess.Popen[bytes]
    log: Path
    version: str

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def build() -> Path:
    """The directory holding bin/kueue and crd/ (built on first use, then cached)."""
    out = subprocess.run([str(BUILD)], check=True, stdout=subprocess.PIPE, text=True, timeout=3600).stdout
    return Path(out.strip().splitlines()[-1])


def version() -> str:
    text = BUILD.read_text()
    return text.split('version="', 1)[1].split('"', 1)[0]


def kubernetes_version() -> str:
    """The Kubernetes release the test control plane is built from (tests/controlplane/go.mod)."""
    for line in CONTROLPLANE_GO_MOD.read_text().splitlines():
        words = line.split()
        if len(words) == 2 and words[0] == "k8s.io/kubernetes" and words[1].startswith("v"):
            return words[1]
    raise RuntimeError(f"no k8s.io/kubernetes requirement in {CONTROLPLANE_GO_MOD}")


def _wait(what: str, ready: Callable[[], bool], procs: list[subprocess.Popen[bytes]], log: Path) -> None:
    deadline = time.monotonic() + 120
    while not ready():
        exited = [p.returncode for p in procs if p.poll() is not None]
        if exited or time.monotonic() > deadline:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
            raise RuntimeError(f"{what}: not ready (exit codes {exited}):\n{tail}")
        time.sleep(1)


def _wait_until_workloads_are_collected(cluster: Cluster) -> None:
    """Returns once kube-controller-manager's garbage collector collects an orphaned Workload.

    Why: the collector learns of new CRDs by polling discovery (every 30 s). Until it watches
    Workloads, deleting a Job in the foreground does not wait for the Job's Workload; a Job
    recreated under the same name is then matched by Kueue to that stale Workload (Kueue finds a
    Job's Workloads by owner name) and stopped when the collector removes it at last ("Missing
    Workload; unable to restore pod templates"). A cluster where Kueue was installed a minute ago
    behaves the same way; the tests start from a settled one. The probe: a Workload owned by a
    ConfigMap that does not exist."""
    owner = {"apiVersion": "v1", "kind": "ConfigMap", "name": "gc-probe", "uid": str(uuid.uuid4())}
    pod_set = {"name": "main", "count": 1, "template": {"spec": {"containers": [{"name": "c", "image": "none"}]}}}
    probe = {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "Workload",
        "metadata": {"name": "gc-probe", "namespace": NAMESPACE, "ownerReferences": [owner]},
        "spec": {"podSets": [pod_set]},
    }
    cluster.kubectl("create", "-f", "-", input=json.dumps(probe))
    probe_args = ("get", "workloads.kueue.x-k8s.io", "-n", NAMESPACE, "gc-probe", "-o", "name", "--ignore-not-found")
    deadline = time.monotonic() + 120
    while cluster.kubectl(*probe_args):
        if time.monotonic() > deadline:
            raise RuntimeError("the garbage collector did not collect an orphaned Workload within 120 s")
        time.sleep(1)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _self_signed(directory: Path, name: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(directory / "tls.key"), "-out", str(directory / "tls.crt"),
         "-subj", f"/CN={name}", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@contextmanager
def running(cluster: Cluster, workdir: Path) -> Iterator[Kueue]:
    """Kueue's CRDs installed and its manager running until the block ends."""
    home = build()
    workdir.mkdir(parents=True, exist_ok=True)
    # Server-side: the Workload CRD is too large for the last-applied annotation of a client-side apply.
    cluster.kubectl("apply", "--server-side", "-f", str(home / "crd"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(home / "crd"))
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    _self_signed(workdir / "webhook-certs", "kueue-webhook")
    made_metrics_certs = not METRICS_CERTS.exists()
    if made_metrics_certs:
        _self_signed(METRICS_CERTS, "kueue-metrics")
    health, webhook, visibility, proxy_port = (controlplane.free_port() for _ in range(4))
    config = {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health}"},
        "metrics": {"bindAddress": "0"},  # not served; the manager still loads its certificate
        "webhook": {"port": webhook, "host": "127.0.0.1", "certDir": str(workdir / "webhook-certs")},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": ["batch/job"]},
        "featureGates": {"VisibilityOnDemand": False},
    }
    config_file = workdir / "kueue-config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    log = workdir / "kueue.log"
    proxy_log = workdir / "versionproxy.log"
    plane = cluster.plane
    _self_signed(workdir / "proxy-certs", "versionproxy")
    kubeconfig = workdir / "kubeconfig-kueue"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: local\n  cluster:\n    server: https://127.0.0.1:{proxy_port}\n"
        f"    certificate-authority: {workdir / 'proxy-certs' / 'tls.crt'}\n"
        f"users:\n- name: admin\n  user:\n    token: {plane.admin.token}\n"
        "contexts:\n- name: local\n  context:\n    cluster: local\n    user: admin\n"
        "current-context: local\n"
    )
    kubeconfig.chmod(0o600)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with proxy_log.open("ab") as out:
            procs.append(
                subprocess.Popen(
                    [
                        str(home / "bin" / "versionproxy"),
                        f"-listen=127.0.0.1:{proxy_port}",
                        f"-upstream={plane.url}",
                        f"-upstream-ca={plane.ca_file}",
                        f"-cert={workdir / 'proxy-certs' / 'tls.crt'}",
                        f"-key={workdir / 'proxy-certs' / 'tls.key'}",
                        f"-git-version={kubernetes_version()}",
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
        _wait("versionproxy", lambda: _listening(proxy_port), procs, proxy_log)
        with log.open("ab") as out:
            procs.append(
                subprocess.Popen(
                    [str(home / "bin" / "kueue"), f"--config={config_file}", f"--visibility-server-port={visibility}"],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={"KUBECONFIG": str(kubeconfig), "PATH": "/usr/bin:/bin"},
                )
            )
        _wait("Kueue", lambda: _ready(f"http://127.0.0.1:{health}/readyz"), procs, log)
        _wait_until_workloads_are_collected(cluster)
        yield Kueue(procs[1], procs[0], log, version())
    finally:
        controlplane.terminate(procs, grace=10)
        if made_metrics_certs:
            shutil.rmtree(METRICS_CERTS.parent.parent, ignore_errors=True)  # /etc/kueue, made here
