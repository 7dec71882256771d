"""A real, local Kubernetes control plane for tests and `rlhfctl dev` (not a production component).

Starts etcd and kube-apiserver (built from their Go modules by ``tests/controlplane/build.sh``)
on free loopback ports, with RBAC on and static-token users: an admin (system:masters) and
the operator's own identity, which holds no rights until RBAC grants them. kube-controller-manager
runs its garbage collector (and PVC protection) only, so owner references cascade deletions as in
a real cluster.
Alone it has no kubelet, scheduler or Job controller (``rlhf_operator.dev.local_kubelet`` plays those);
with ``NodeOptions`` it serves a real node instead (``rlhf_operator.dev.cluster``): every default
controller runs, Pods get ServiceAccount tokens, and kubelets are authorized by the Node authorizer.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
BUILD_SCRIPT = REPO / "tests" / "controlplane" / "build.sh"
OPERATOR_USER = "system:serviceaccount:rlhf-system:rlhf-operator"
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"  # the `kubernetes` Service: the first address of SERVICE_CIDR


def binaries_dir() -> Path:
    """Directory holding etcd, kube-apiserver and kubectl; builds them on first use (cached)."""
    override = os.environ.get("RLHF_CONTROLPLANE_BIN")
    if override:
        return Path(override)
    out = subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class User:
    name: str
    token: str
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeOptions:
    """What the control plane needs to serve a real kubelet (see rlhf_operator.dev.cluster)."""

    # The API server's address as Pods see it: the `kubernetes` Service's endpoint, which kube-proxy
    # forwards 10.96.0.1:443 to. Loopback would be the Pod's own loopback.
    advertise_address: str
    # The API server's client certificate for the kubelet API (logs, exec), trusted by the kubelet.
    kubelet_client_cert: Path
    kubelet_client_key: Path
    # The kubelet's own identity (system:node:NAME in system:nodes) for the Node authorizer.
    node_user: User


@dataclass
class ControlPlane:
    """A running etcd + kube-apiserver pair and the credentials to reach it."""

    workdir: Path
    bin_dir: Path
    url: str
    ca_file: Path
    admin: User
    operator: User
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    # The command lines of etcd and kube-apiserver by name, and the log they write to, so that a fault
    # test can stop one and start it again on the same ports and data (``stopped``).
    commands: dict[str, list[str]] = field(default_factory=dict)
    log: Path | None = None

    def kubeconfig(self, user: User | None = None, path: Path | None = None) -> Path:
        """Writes a kubeconfig for ``user`` (default: admin) and returns its path."""
        user = user or self.admin
        path = path or self.workdir / f"kubeconfig-{user.name.replace(':', '-')}"
        text = (
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: local\n  cluster:\n    server: {self.url}\n"
            f"    certificate-authority: {self.ca_file}\n"
            f"users:\n- name: {user.name}\n  user:\n    token: {user.token}\n"
            f"contexts:\n- name: local\n  context:\n    cluster: local\n    user: {user.name}\n"
            "current-context: local\n"
        )
        # Every kubectl call asks for the file, while other processes (a kubelet, an operator, other
        # kubectl calls) read it: rewriting it in place let one of them read it empty (a local
        # kubelet died on that in make test). Written once, atomically; unchanged, left alone.
        if not path.exists() or path.read_text() != text:
            partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
            partial.write_text(text)
            partial.chmod(0o600)
            os.replace(partial, path)
        return path

    def kubectl(self, *args: str, user: User | None = None, input: str | None = None, check: bool = True) -> str:
        """Runs the kubectl built with the control plane; returns stdout, raises with stderr on failure."""
        cmd = [str(self.bin_dir / "kubectl"), "--kubeconfig", str(self.kubeconfig(user)), *args]
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=120, check=False)
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc.stdout if check else proc.stdout + proc.stderr

    def stop(self) -> None:
        # Top down: etcd last. kube-apiserver's graceful shutdown removes its own endpoint from etcd;
        # with etcd stopped at the same moment it waited out the whole grace period (15 s) instead.
        etcd = [proc for proc in self.processes if proc.args == self.commands.get("etcd")]
        terminate([proc for proc in self.processes if proc not in etcd], grace=15)
        terminate(etcd, grace=15)
        self.processes.clear()

    @contextlib.contextmanager
    def stopped(self, component: str, kill: bool = False) -> Iterator[None]:
        """One component ("etcd" or "kube-apiserver") down for the body of the ``with``, then started
        again with the same command line (same port, same etcd data dir); returns once the API server
        answers /readyz again. ``kill``: SIGKILL instead of SIGTERM (a crash, not a shutdown)."""
        argv = self.commands[component]
        index = next(i for i, proc in enumerate(self.processes) if proc.args == argv)
        proc = self.processes[index]
        if kill:
            proc.kill()
            proc.wait()
        else:
            terminate([proc], grace=15)
        try:
            yield
        finally:
            assert self.log is not None
            self.processes[index] = _spawn(argv, self.log)
            _wait_ready(self.url, self.admin.token, self.ca_file, self.processes, self.log)


def terminate(processes: list[subprocess.Popen[bytes]], grace: float) -> None:
    """SIGTERM in reverse start order, then SIGKILL whatever has not exited after ``grace`` seconds."""
    for proc in reversed(processes):
        if proc.poll() is None:
            proc.terminate()
    for proc in reversed(processes):
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:  # the child holds its own descriptor
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_ready(url: str, token: str, ca_file: Path, procs: list[subprocess.Popen[bytes]], log: Path) -> None:
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file.exists() else ssl._create_unverified_context()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"control plane process exited with {proc.returncode}; see {log}:\n{log.read_text()[-3000:]}"
                )
        request = urllib.request.Request(f"{url}/readyz", headers={"Authorization": f"Bearer {token}"})
        with (
            contextlib.suppress(OSError, urllib.error.URLError),
            urllib.request.urlopen(request, context=context, timeout=5) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"kube-apiserver not ready after 120 s; see {log}")


def start(workdir: Path | None = None, bin_dir: Path | None = None, node: NodeOptions | None = None) -> ControlPlane:
    """Starts etcd and kube-apiserver; the caller must ``stop()`` the result."""
    bin_dir = bin_dir or binaries_dir()
    workdir = Path(workdir or tempfile.mkdtemp(prefix="rlhf-controlplane-"))
    workdir.mkdir(parents=True, exist_ok=True)
    certs = workdir / "certs"
    certs.mkdir(exist_ok=True)
    sa_key = certs / "sa.key"
    subprocess.run(["openssl", "genrsa", "-out", str(sa_key), "2048"], check=True, capture_output=True)
    if node is not None:
        _write_serving_cert(certs, node.advertise_address)

    admin = User("admin", secrets.token_hex(16), ("system:masters",))
    operator = User(
        OPERATOR_USER, secrets.token_hex(16), ("system:serviceaccounts", "system:serviceaccounts:rlhf-system")
    )
    tokens = workdir / "tokens.csv"
    users = (admin, operator, node.node_user) if node else (admin, operator)
    tokens.write_text("".join(f'{u.token},{u.name},{u.name},"{",".join(u.groups)}"\n' for u in users))
    tokens.chmod(0o600)

    etcd_client, etcd_peer, api_port = free_port(), free_port(), free_port()
    log = workdir / "controlplane.log"
    log_file = log.open("ab")
    etcd_argv = [
        str(bin_dir / "etcd"),
        "--data-dir",
        str(workdir / "etcd"),
        "--listen-client-urls",
        f"http://127.0.0.1:{etcd_client}",
        "--advertise-client-urls",
        f"http://127.0.0.1:{etcd_client}",
        "--listen-peer-urls",
        f"http://127.0.0.1:{etcd_peer}",
        "--initial-advertise-peer-urls",
        f"http://127.0.0.1:{etcd_peer}",
        "--initial-cluster",
        f"default=http://127.0.0.1:{etcd_peer}",
        "--unsafe-no-fsync",  # test data only: trades durability for speed
        "--log-level",
        "warn",
    ]
    apiserver_argv = [
        str(bin_dir / "kube-apiserver"),
        "--etcd-servers",
        f"http://127.0.0.1:{etcd_client}",
        *_apiserver_mode_args(node),
        "--secure-port",
        str(api_port),
        "--cert-dir",
        str(certs),
        "--token-auth-file",
        str(tokens),
        "--service-account-issuer",
        "https://kubernetes.default.svc.cluster.local",
        "--service-account-key-file",
        str(sa_key),
        "--service-account-signing-key-file",
        str(sa_key),
        "--service-cluster-ip-range",
        SERVICE_CIDR,
        "--v",
        "1",
    ]
    etcd, apiserver = _spawn(etcd_argv, log), _spawn(apiserver_argv, log)
    url = f"https://127.0.0.1:{api_port}"
    plane = ControlPlane(
        workdir,
        bin_dir,
        url,
        certs / "apiserver.crt",
        admin,
        operator,
        [etcd, apiserver],
        {"etcd": etcd_argv, "kube-apiserver": apiserver_argv},
        log,
    )
    try:
        _wait_ready(url, admin.token, plane.ca_file, plane.processes, log)
        plane.processes.append(_start_controller_manager(plane, log_file, sa_key, all_controllers=node is not None))
    except BaseException:
        plane.stop()
        raise
    return plane


def _write_serving_cert(certs: Path, advertise_address: str) -> None:
    """The API server's self-signed serving certificate, valid for loopback (tests, kubectl), the
    advertise address and the `kubernetes` Service (Pods). The API server generates one itself
    only for the advertise address and the Service, which loopback clients would then reject."""
    names = ["IP:127.0.0.1", f"IP:{advertise_address}", f"IP:{SERVICE_IP}", "DNS:localhost", "DNS:kubernetes"]
    names += [f"DNS:kubernetes.default{suffix}" for suffix in ("", ".svc", ".svc.cluster.local")]
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "30",
            "-keyout",
            str(certs / "apiserver.key"),
            "-out",
            str(certs / "apiserver.crt"),
            "-subj",
            "/CN=kube-apiserver",
            "-addext",
            f"subjectAltName={','.join(names)}",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,digitalSignature,keyEncipherment,keyCertSign",
        ],
        check=True,
        capture_output=True,
    )


def _apiserver_mode_args(node: NodeOptions | None) -> list[str]:
    if node is None:
        # API only: no Pod ever runs, so no ServiceAccount token is mounted (and no controller
        # creates the `default` ServiceAccount the admission plugin would insist on).
        return [
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            "--authorization-mode=RBAC",
            "--disable-admission-plugins=ServiceAccount",
        ]
    return [
        # Pods reach the API server through the `kubernetes` Service, whose endpoint is the
        # advertise address on the node's Pod bridge; tests and kubectl keep using loopback.
        "--bind-address=0.0.0.0",
        f"--advertise-address={node.advertise_address}",
        "--authorization-mode=Node,RBAC",
        "--enable-admission-plugins=NodeRestriction",
        f"--kubelet-client-certificate={node.kubelet_client_cert}",
        f"--kubelet-client-key={node.kubelet_client_key}",
        # The node registers 127.0.0.1 as its InternalIP: `kubectl logs` must resolve it.
        "--kubelet-preferred-address-types=InternalIP",
    ]


def _start_controller_manager(
    plane: ControlPlane, log_file: Any, sa_key: Path, all_controllers: bool
) -> subprocess.Popen[bytes]:
    """kube-controller-manager: the garbage collector alone (deleting a run deletes what it owns),
    or, for a real node, every default controller (Job, TTL-after-finished, PV binder, node
    lifecycle, ServiceAccount tokens, ...)."""
    if all_controllers:
        mode = [
            "--controllers=*",
            f"--service-account-private-key-file={sa_key}",
            # Published as the kube-root-ca.crt ConfigMap that every Pod's token volume carries.
            f"--root-ca-file={plane.ca_file}",
            "--use-service-account-credentials=false",
            # Nodes are marked NotReady (and their Pods evicted) sooner than the default 40 s.
            "--node-monitor-grace-period=20s",
        ]
    else:
        # pvc-protection removes the kubernetes.io/pvc-protection finalizer of deleted, unused PVCs.
        mode = ["--controllers=garbagecollector,pvc-protection"]
    return subprocess.Popen(
        [
            str(plane.bin_dir / "kube-controller-manager"),
            "--kubeconfig",
            str(plane.kubeconfig(plane.admin, plane.workdir / "kubeconfig-controller-manager")),
            *mode,
            "--leader-elect=false",
            "--secure-port",
            "0",
            "--concurrent-gc-syncs",
            "5",
            "--v",
            "1",
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@contextlib.contextmanager
def running(workdir: Path | None = None) -> Iterator[ControlPlane]:
    """Context manager form of ``start()`` that always stops and cleans up."""
    owned = workdir is None
    plane = start(workdir)
    try:
        yield plane
    finally:
        plane.stop()
        if owned:
            shutil.rmtree(plane.workdir, ignore_errors=True)
