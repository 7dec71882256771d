"""What a Kubernetes node needs from this machine (for rlhf_operator.dev.cluster): Debian's packages,
the Pod bridge and the kernel settings kube-proxy relies on, containerd configured for the CRI with
runc and the CNI bridge plugin, and the clean-up of what a node leaves behind (mounts, network
namespaces, containers). Root only; one node at a time (the names below are fixed).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

BRIDGE = "rlhf0"
POD_SUBNET = "10.88.0.0/16"
BRIDGE_ADDRESS = "10.88.0.1"
# containerd's CRI plugin runs Pod sandboxes from this name; the pause image is tagged with it.
SANDBOX_IMAGE = "localhost/rlhf-pause:sandbox"
CRI_NAMESPACE = "k8s.io"
RUN_DIR = Path("/run/rlhf-node")
CONTAINERD_SOCKET = RUN_DIR / "containerd.sock"
HOST_PACKAGES = {
    "containerd": "containerd",
    "runc": "runc",
    "/usr/lib/cni/bridge": "containernetworking-plugins",
    "iptables": "iptables",
}


def cache_root() -> Path:
    explicit = os.environ.get("RLHF_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rlhf-operator"


# --- host preparation -------------------------------------------------------------------------


def ensure_host_packages() -> None:
    """Installs containerd, runc, the CNI plugins and iptables from Debian's packages when missing."""
    if os.geteuid() != 0:
        raise PermissionError("a real node needs root (containerd, runc, network namespaces, iptables)")
    missing = sorted({pkg for tool, pkg in HOST_PACKAGES.items() if not (Path(tool).exists() or shutil.which(tool))})
    if not missing:
        return
    print(f"installing Debian packages for the node: {' '.join(missing)}", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)


def _sysctl(key: str, value: str) -> None:
    Path("/proc/sys", *key.split(".")).write_text(value)


def prepare_pod_network() -> None:
    """The bridge Pods attach to, made before the CNI plugin would, so the API server can advertise
    its address; forwarding and bridged traffic through iptables (kube-proxy's Service rules)."""
    if not Path("/proc/sys/net/bridge").exists():
        subprocess.run(["modprobe", "br_netfilter"], check=False)
    _sysctl("net.ipv4.ip_forward", "1")
    _sysctl("net.bridge.bridge-nf-call-iptables", "1")
    remove_pod_network()
    subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], check=True)
    subprocess.run(["ip", "addr", "add", f"{BRIDGE_ADDRESS}/16", "dev", BRIDGE], check=True)
    subprocess.run(["ip", "link", "set", BRIDGE, "up"], check=True)


def remove_pod_network() -> None:
    # Sandboxes of a cluster that died without tearing them down keep a netns and a veth each.
    netns = Path("/run/netns")
    for ns in netns.glob("cni-*") if netns.exists() else []:
        subprocess.run(["ip", "netns", "delete", ns.name], check=False, capture_output=True)
    subprocess.run(["ip", "link", "delete", BRIDGE], check=False, capture_output=True)


def unmount_under(root: Path) -> None:
    """Unmounts what the kubelet mounted for Pods (tmpfs volumes, local volumes) under ``root``."""
    with contextlib.suppress(OSError):
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
        points = [line.split()[4] for line in lines]
        for point in sorted((p for p in points if p.startswith(str(root))), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def write_kubelet_client_certs(directory: Path) -> tuple[Path, Path, Path]:
    """A CA the kubelet trusts for client certificates, and the API server's certificate from it."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = directory / "kubelet-ca.key", directory / "kubelet-ca.crt"
    key, csr, crt = (
        directory / "apiserver-kubelet.key",
        directory / "apiserver-kubelet.csr",
        directory / "apiserver-kubelet.crt",
    )

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca_crt),
        "-days",
        "30",
        "-subj",
        "/CN=rlhf-node-kubelet-ca",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        "/O=system:masters/CN=kube-apiserver-kubelet-client",
    )
    openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca_crt),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-out",
        str(crt),
        "-days",
        "30",
    )
    return ca_crt, crt, key


# --- containerd --------------------------------------------------------------------------------


def _containerd_config(workdir: Path, store: Path, socket: Path) -> str:
    # restrict_oom_score_adj: this machine denies lowering oom_score_adj (no CAP_SYS_RESOURCE).
    # runc, not crun: crun refuses the hybrid cgroup v1 layout here.
    return f"""version = 2
root = "{store}"
state = "{RUN_DIR / "containerd"}"
[grpc]
  address = "{socket}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{SANDBOX_IMAGE}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{workdir / "cni"}"
"""


def _cni_config(workdir: Path) -> str:
    return json.dumps(
        {
            "cniVersion": "1.0.0",
            "name": "rlhf-pods",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": True,
                    "hairpinMode": True,  # a Pod reaching a Service that leads back to itself
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_SUBNET, "gateway": BRIDGE_ADDRESS}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(workdir / "cni-ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        },
        indent=1,
    )


def start_containerd(workdir: Path, log: IO[bytes]) -> tuple[subprocess.Popen[bytes], Path]:
    store = cache_root() / "containerd"
    store.mkdir(parents=True, exist_ok=True)
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    socket = CONTAINERD_SOCKET
    (workdir / "cni").mkdir(parents=True, exist_ok=True)
    (workdir / "cni" / "10-rlhf-pods.conflist").write_text(_cni_config(workdir))
    config = workdir / "containerd.toml"
    config.write_text(_containerd_config(workdir, store, socket))
    proc = subprocess.Popen(
        ["containerd", "--config", str(config), "--log-level", "warn"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while True:
        ok = subprocess.run(["ctr", "--address", str(socket), "version"], capture_output=True, check=False)
        if ok.returncode == 0:
            return proc, socket
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"containerd did not start; see {log.name}")
        time.sleep(0.3)


def kill_leftover_tasks(socket: Path) -> None:
    """Containers the kubelet did not stop (it was killed, or timed out) die with the cluster."""
    if not socket.exists():
        return
    base = ["ctr", "--address", str(socket), "-n", CRI_NAMESPACE]
    tasks = subprocess.run([*base, "tasks", "ls", "-q"], capture_output=True, text=True, check=False).stdout.split()
    for task in tasks:
        subprocess.run([*base, "tasks", "kill", "-s", "SIGKILL", task], capture_output=True, check=False)
    for task in tasks:
        subprocess.run([*base, "tasks", "delete", "-f", task], capture_output=True, check=False)
    containers = subprocess.run([*base, "containers", "ls", "-q"], capture_output=True, text=True, check=False)
    for container in containers.stdout.split():
        subprocess.run([*base, "containers", "delete", container], capture_output=True, check=False)
