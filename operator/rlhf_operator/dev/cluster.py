"""A real single-node Kubernetes cluster on this machine, for the node test tier and ``make cluster``.

Everything is the real component, built from the Kubernetes Go modules the project pins
(``tests/controlplane/build.sh``) or installed from Debian's packages: etcd, kube-apiserver,
kube-controller-manager with every default controller, kube-scheduler, kube-proxy (iptables mode),
and a kubelet driving containerd (CRI plugin) with runc and the CNI bridge plugin, cgroupfs.
Images come from ``images/build.py`` (built here, imported into this cluster's containerd).

What is particular to a laptop-sized, single-node test cluster, and why:
- Pods live on the bridge ``rlhf0`` (10.88.0.0/16); the API server listens on every address and
  advertises the bridge's own address, where kube-proxy forwards the ``kubernetes`` Service;
- one node, ``rlhf-node``, whose InternalIP is that bridge address too (the kubelet refuses a
  loopback node IP), and the API server reaches the kubelet there (``kubectl logs``);
- storage is local PersistentVolumes (StorageClass ``local``, no provisioner, WaitForFirstConsumer):
  ``add_volumes`` makes more; RWO behaves as RWO because each volume is bound to one claim;
- the node advertises ``nvidia.com/gpu`` capacity through its status, so GPU-requesting specs
  schedule; nothing provides a device, so stages run on the CPU;
- containerd's image store lives in the cache directory (images survive between sessions), its
  state under /run; one cluster runs at a time (a lock file says so).
Root only. Not a production component: there is no DNS add-on and no network policy.
What the machine itself must provide (packages, the bridge, containerd) is ``rlhf_operator.dev.host``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rlhf_api.names import TEST_VOLUME_LABEL

from . import controlplane
from .controlplane import ControlPlane, NodeOptions, User
from .host import (
    BRIDGE_ADDRESS,
    CONTAINERD_SOCKET,
    CRI_NAMESPACE,
    POD_SUBNET,
    SANDBOX_IMAGE,
    cache_root,
    ensure_host_packages,
    kill_leftover_tasks,
    prepare_pod_network,
    remove_pod_network,
    start_containerd,
    unmount_under,
    write_kubelet_client_certs,
)

NODE_NAME = "rlhf-node"
STORAGE_CLASS = "local"
# What the node says it has: enough for the tests' GPU-requesting specs to schedule.
GPU_CAPACITY = 8
REPO = controlplane.REPO
IMAGE_BUILD_SCRIPT = REPO / "images" / "build.py"

# Takes containerd's socket, loads the images into it, returns their references by name
# ("pause", "operator", "stages").
ImageLoader = Callable[[Path], Mapping[str, str]]


@dataclass
class Cluster:
    """A running single-node cluster: its control plane, the node's processes and their logs."""

    plane: ControlPlane
    workdir: Path
    containerd_socket: Path
    images: Mapping[str, str]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _lock: IO[str] | None = None
    _volumes: int = 0

    def kubectl(self, *args: str, user: User | None = None, input: str | None = None, check: bool = True) -> str:
        return self.plane.kubectl(*args, user=user, input=input, check=check)

    def ctr(self, *args: str, check: bool = True) -> str:
        """containerd's own CLI against this node's containerd, in the CRI namespace."""
        cmd = ["ctr", "--address", str(self.containerd_socket), "-n", CRI_NAMESPACE, *args]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120).stdout

    def add_volumes(self, count: int, size: str = "200Gi") -> None:
        """Adds ``count`` local PersistentVolumes to the pool claims bind to."""
        docs = []
        for _ in range(count):
            self._volumes += 1
            name = f"local-pv-{self._volumes:03d}"
            path = self.workdir / "volumes" / name
            path.mkdir(parents=True, exist_ok=True)
            docs.append(_local_volume(name, path, size))
        self.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs))

    def stop(self) -> None:
        """Stops every Pod's containers, then the node, then the control plane; cleans up mounts."""
        try:
            self._stop_pods()
        finally:
            # While containerd still answers: a sandbox the kubelet did not tear down would otherwise
            # outlive the cluster (its shim and pause process) until the next start cleaned it up.
            kill_leftover_tasks(self.containerd_socket)
            controlplane.terminate(self.processes, grace=20)
            self.processes.clear()
            kill_leftover_tasks(self.containerd_socket)  # a no-op unless containerd was already gone
            self.plane.stop()
            unmount_under(self.workdir)
            remove_pod_network()
            if self._lock is not None:
                self._lock.close()
                self._lock = None

    def _stop_pods(self) -> None:
        # Deleting the Pods through the API lets the kubelet tear their sandboxes down properly
        # (CNI DEL frees the IP and the veth); grace 0 because the tier is over.
        if not self.processes or any(p.poll() is not None for p in self.processes):
            return
        self.kubectl("delete", "pods", "--all", "-A", "--grace-period=0", "--force", "--wait=false", check=False)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.ctr("tasks", "ls", "-q", check=False).strip():
            time.sleep(1)


def _local_volume(name: str, path: Path, size: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name, "labels": {TEST_VOLUME_LABEL: "true"}},
        "spec": {
            "capacity": {"storage": size},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": STORAGE_CLASS,
            "local": {"path": str(path)},
            "nodeAffinity": {
                "required": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": "kubernetes.io/hostname", "operator": "In", "values": [NODE_NAME]}
                            ]
                        }
                    ]
                }
            },
        },
    }


# --- node components ---------------------------------------------------------------------------


def _kubelet_config(workdir: Path, socket: Path, client_ca: Path) -> str:
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "containerRuntimeEndpoint": f"unix://{socket}",
        "cgroupDriver": "cgroupfs",
        "failSwapOn": False,
        "address": BRIDGE_ADDRESS,
        "port": controlplane.free_port(),
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": controlplane.free_port(),
        # Only the API server (its client certificate) may call the kubelet API.
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": False},
            "x509": {"clientCAFile": str(client_ca)},
        },
        "authorization": {"mode": "AlwaysAllow"},
        "clusterDomain": "cluster.local",
        "podLogsDir": str(workdir / "pod-logs"),
        "nodeStatusUpdateFrequency": "5s",
        "serializeImagePulls": False,
        # The stage image is large and rebuilt rarely: never collect it to make room.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "maxPods": 40,
    }
    return json.dumps(config, indent=1)


def _start_node_components(
    plane: ControlPlane, workdir: Path, socket: Path, client_ca: Path, node_user: User, log: IO[bytes]
) -> list[subprocess.Popen[bytes]]:
    bins = plane.bin_dir
    admin_kubeconfig = str(plane.kubeconfig(plane.admin, workdir / "kubeconfig-node-admin"))
    kubelet_dir = workdir / "kubelet"
    kubelet_dir.mkdir(parents=True, exist_ok=True)
    (workdir / "pod-logs").mkdir(parents=True, exist_ok=True)
    kubelet_config = workdir / "kubelet.json"
    kubelet_config.write_text(_kubelet_config(workdir, socket, client_ca))

    def spawn(*cmd: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    return [
        spawn(
            str(bins / "kube-scheduler"),
            f"--kubeconfig={admin_kubeconfig}",
            "--leader-elect=false",
            "--secure-port=0",
            "--v=1",
        ),
        spawn(
            str(bins / "kube-proxy"),
            f"--kubeconfig={admin_kubeconfig}",
            f"--hostname-override={NODE_NAME}",
            "--proxy-mode=iptables",
            f"--cluster-cidr={POD_SUBNET}",
            "--conntrack-max-per-core=0",
            f"--metrics-bind-address=127.0.0.1:{controlplane.free_port()}",
            f"--healthz-bind-address=127.0.0.1:{controlplane.free_port()}",
            "--v=1",
        ),
        spawn(
            str(bins / "kubelet"),
            f"--config={kubelet_config}",
            f"--kubeconfig={plane.kubeconfig(node_user, workdir / 'kubeconfig-kubelet')}",
            f"--hostname-override={NODE_NAME}",
            f"--node-ip={BRIDGE_ADDRESS}",
            f"--root-dir={kubelet_dir}",
            f"--cert-dir={kubelet_dir / 'pki'}",
            "--v=1",
        ),
    ]


def _wait(
    what: str, check: Callable[[], bool], timeout: float, procs: list[subprocess.Popen[bytes]], log: Path
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} waiting for {what}; see {log}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not after {timeout:.0f} s; see {log}")
        time.sleep(1)


def _node_ready(plane: ControlPlane) -> bool:
    out = plane.kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
    try:
        node = json.loads(out)
    except ValueError:
        return False
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", []))
    # The node lifecycle controller removes the not-ready taint a moment after Ready.
    tainted = any(t["key"] == "node.kubernetes.io/not-ready" for t in node["spec"].get("taints", []))
    return ready and not tainted


def _advertise_gpus(plane: ControlPlane) -> None:
    # An extended resource in the node's status is how a node without a device plugin advertises
    # it (the kubelet keeps capacity it does not manage). Stages then run on the CPU.
    patch = [
        {"op": "add", "path": f"/status/{part}/nvidia.com~1gpu", "value": str(GPU_CAPACITY)}
        for part in ("capacity", "allocatable")
    ]
    plane.kubectl("patch", "node", NODE_NAME, "--subresource=status", "--type=json", "-p", json.dumps(patch))


STORAGE_CLASS_MANIFEST = {
    "apiVersion": "storage.k8s.io/v1",
    "kind": "StorageClass",
    "metadata": {"name": STORAGE_CLASS, "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
    "provisioner": "kubernetes.io/no-provisioner",
    # Bind when the first Pod is scheduled, as local volumes must.
    "volumeBindingMode": "WaitForFirstConsumer",
}


def start(workdir: Path, load_images: ImageLoader, bin_dir: Path | None = None, volumes: int = 24) -> Cluster:
    """Starts the whole single-node cluster; the caller must ``stop()`` it."""
    ensure_host_packages()
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cache_root().mkdir(parents=True, exist_ok=True)
    lock = (cache_root() / "node.lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise RuntimeError(f"another node cluster runs on this machine (lock {lock.name})") from None
    log_path = workdir / "node.log"
    log = log_path.open("ab")
    processes: list[subprocess.Popen[bytes]] = []
    socket = CONTAINERD_SOCKET
    plane: ControlPlane | None = None
    try:
        kill_leftover_tasks(socket)  # a previous cluster that was SIGKILLed
        prepare_pod_network()
        containerd, socket = start_containerd(workdir, log)
        processes.append(containerd)
        images = dict(load_images(socket))
        subprocess.run(
            [
                "ctr",
                "--address",
                str(socket),
                "-n",
                CRI_NAMESPACE,
                "images",
                "tag",
                "--force",
                images["pause"],
                SANDBOX_IMAGE,
            ],
            check=True,
            capture_output=True,
        )
        client_ca, client_crt, client_key = write_kubelet_client_certs(workdir / "node-certs")
        node_user = User(f"system:node:{NODE_NAME}", os.urandom(16).hex(), ("system:nodes",))
        options = NodeOptions(BRIDGE_ADDRESS, client_crt, client_key, node_user)
        plane = controlplane.start(workdir / "controlplane", bin_dir, node=options)
        processes += _start_node_components(plane, workdir, socket, client_ca, node_user, log)
        _wait("node Ready", lambda: _node_ready(plane), 120, processes, log_path)
        _advertise_gpus(plane)
        plane.kubectl("apply", "-f", "-", input=json.dumps(STORAGE_CLASS_MANIFEST))
        _wait(
            "the default ServiceAccount",
            lambda: bool(plane.kubectl("get", "sa", "default", "-o", "name", check=False).strip()),
            60,
            processes,
            log_path,
        )
        cluster = Cluster(plane, workdir, socket, images, processes, lock)
        cluster.add_volumes(volumes)
        return cluster
    except BaseException:
        controlplane.terminate(processes, grace=20)
        kill_leftover_tasks(socket)
        if plane is not None:
            plane.stop()
        unmount_under(workdir)
        lock.close()
        raise


def build_images(socket: Path) -> Mapping[str, str]:
    """The project's images, built by images/build.py (cached by their inputs) into this containerd."""
    out = subprocess.run(
        [
            sys.executable,
            str(IMAGE_BUILD_SCRIPT),
            "--containerd-address",
            str(socket),
            "--pause-binary",
            str(controlplane.binaries_dir() / "pause"),
        ],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    refs: dict[str, str] = json.loads(out.stdout)
    return {name: refs[name] for name in ("pause", "operator", "stages")}


@contextlib.contextmanager
def running(workdir: Path, load_images: ImageLoader = build_images) -> Iterator[Cluster]:
    cluster = start(workdir, load_images)
    try:
        yield cluster
    finally:
        cluster.stop()


def main() -> None:
    """``make cluster``: start the node, print how to reach it, run until Ctrl-C."""
    workdir = Path(sys.argv[1] if len(sys.argv) > 1 else ".rlhf-cluster").resolve()
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _: stop.append(signum))
    started = time.monotonic()
    with running(workdir) as cluster:
        kubeconfig = cluster.plane.kubeconfig()
        print(f"cluster ready in {time.monotonic() - started:.0f} s", flush=True)
        print(f"  export KUBECONFIG={kubeconfig}", flush=True)
        for name, ref in cluster.images.items():
            print(f"  image {name}: {ref}", flush=True)
        print(f"  logs: {workdir / 'node.log'}; Ctrl-C stops the cluster", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while not stop and all(p.poll() is None for p in cluster.processes):
                time.sleep(1)


if __name__ == "__main__":
    main()
