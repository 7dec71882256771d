"""``rlhfctl dev``: a whole local stack so ``kubectl apply -f examples/tiny.yaml`` works on a laptop.

Starts the real control plane (etcd, kube-apiserver, the garbage collector; built from source and
cached on first use), installs the CRD, then runs the operator and the local kubelet (which
runs stage Jobs as local processes, the volume a local directory). Ctrl-C (or SIGTERM) stops
everything, running stages included, and exits 0; exit 1 means a component died on its own.
Development only: the local kubelet is a stand-in for the Job controller and kubelet.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rlhf_api.names import CRD_NAME
from rlhf_operator.dev import controlplane

from .local import SOURCE_ROOT, stage_env

CRD_FILE = SOURCE_ROOT.parent / "crds" / "rlhfruns.rlhf-operator.io.yaml"


def add_arguments(_: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(".rlhf-dev"),
        help="control plane data, the local volume and logs (default: .rlhf-dev)",
    )
    parser.add_argument(
        "--tiny-assets",
        action="store_true",
        help="build the tiny model and data into the volume's assets/ (for examples/tiny.yaml)",
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter for the operator and stages")
    parser.add_argument(
        "--stage-python-path",
        action="append",
        default=[],
        metavar="DIR",
        help="tests only: put DIR first on the stages' PYTHONPATH (e.g. fake stages); repeatable",
    )


GRACE_SECONDS = 20.0  # a running stage's time to checkpoint after SIGTERM, as a pod's grace period


def _spawn(python: str, module: str, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [python, "-m", module, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=stage_env(log.with_suffix(".result.json")),
        )


def _wait_established(plane: controlplane.ControlPlane, crd: str) -> None:
    # `kubectl wait` errors out (instead of waiting) while a new CRD has no status.conditions yet.
    deadline = time.monotonic() + 60
    while True:
        out = plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", crd, check=False)
        if out.startswith("customresourcedefinition"):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{crd} never became Established: {out}")
        time.sleep(0.5)


_received: list[int] = []


def _interrupt(signum: int, frame: object) -> None:
    _received.append(signum)
    raise KeyboardInterrupt


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    if _received[:1] == [signal.SIGINT]:
        # Ctrl-C in a terminal reaches the whole foreground process group: the operator and the
        # local kubelet are stopping already, and a second signal makes kopf log a spurious error.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(p.poll() is None for p in processes):
            time.sleep(0.1)
    for proc in processes:
        if proc.poll() is None:
            proc.terminate()
    for proc in processes:  # the local kubelet gives running stages GRACE_SECONDS to checkpoint
        try:
            proc.wait(timeout=GRACE_SECONDS + 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(args: Any) -> int:
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)  # stop as cleanly as on Ctrl-C
    workdir = args.workdir.resolve()
    volume, logs = workdir / "volume", workdir / "logs"
    volume.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    if args.tiny_assets and not (volume / "assets" / "base-model").exists():
        print("building tiny assets ...", flush=True)
        subprocess.run(
            [args.python, "-m", "rlhf_stages.tiny", "--out", str(volume / "assets")],
            check=True,
            env=stage_env(logs / "assets.result.json"),
        )
    print("starting etcd and kube-apiserver (the first start builds them from source: ~10 min) ...", flush=True)
    plane = controlplane.start(workdir / "controlplane")
    processes: list[subprocess.Popen[bytes]] = []
    try:
        plane.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
        _wait_established(plane, f"crd/{CRD_NAME}")
        kubeconfig = plane.kubeconfig(path=workdir / "kubeconfig")
        processes.append(
            _spawn(
                args.python,
                "rlhf_operator",
                [
                    "run",
                    "--kubeconfig",
                    str(kubeconfig),
                    "--no-leader-election",
                    "--health-host",
                    "127.0.0.1",
                    "--health-port",
                    "0",
                ],
                logs / "operator.log",
            )
        )
        processes.append(
            _spawn(
                args.python,
                "rlhf_operator.dev.local_kubelet",
                [
                    "--kubeconfig",
                    str(kubeconfig),
                    "--volume-dir",
                    str(volume),
                    "--work-dir",
                    str(workdir / "pods"),
                    "--grace-seconds",
                    str(GRACE_SECONDS),
                    *(f"--python-path={Path(path).resolve()}" for path in args.stage_python_path),
                ],
                logs / "local-kubelet.log",
            )
        )
        print(
            f"\nready. In another shell:\n"
            f"  export KUBECONFIG={kubeconfig}\n"
            f"  kubectl apply -f examples/tiny.yaml      # needs --tiny-assets on this command\n"
            f"  kubectl get rlhfrun -w\n"
            f"kubectl: {plane.bin_dir / 'kubectl'}   volume: {volume}   logs: {logs}\n"
            f"Ctrl-C stops everything.",
            flush=True,
        )
        while all(p.poll() is None for p in processes):
            time.sleep(1)
        print("a component exited; see the logs in", logs, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        # A second Ctrl-C must not cut this short: etcd, the API server and stages would be left running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("stopping ...", file=sys.stderr, flush=True)
        _stop(processes)
        plane.stop()
