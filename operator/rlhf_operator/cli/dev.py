"""``rlhfctl dev``: a whole local stack so ``kubectl apply -f examples/tiny.yaml`` works on a laptop.

Starts the real control plane (etcd, kube-apiserver, the garbage collector; built from source and
cached on first use), installs the CRD, then runs the operator and the dev Job executor (which
runs stage Jobs as local processes, the volume a local directory). Ctrl-C stops everything.
Development only: the executor is a stand-in for the Job controller and kubelet.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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


def _spawn(python: str, module: str, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [python, "-m", module, *args],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env=stage_env(log.with_suffix(".result.json")),
    )


def run(args: Any) -> int:
    workdir = args.workdir.resolve()
    volume, logs = workdir / "volume", workdir / "logs"
    volume.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    if args.tiny_assets and not (volume / "assets" / "base-model").exists():
        print("building tiny assets ...")
        subprocess.run(
            [args.python, "-m", "rlhf_stages.tiny_assets", "--out", str(volume / "assets")],
            check=True,
            env=stage_env(logs / "assets.result.json"),
        )
    print("starting etcd and kube-apiserver (the first start builds them from source: ~10 min) ...")
    plane = controlplane.start(workdir / "controlplane")
    processes: list[subprocess.Popen[bytes]] = []
    try:
        plane.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
        plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/rlhfruns.rlhf-operator.io")
        kubeconfig = plane.kubeconfig(path=workdir / "kubeconfig")
        processes.append(
            _spawn(
                args.python,
                "rlhf_operator",
                ["run", "--kubeconfig", str(kubeconfig), "--no-leader-election", "--health-port", "0"],
                logs / "operator.log",
            )
        )
        processes.append(
            _spawn(
                args.python,
                "rlhf_operator.dev.executor",
                ["--kubeconfig", str(kubeconfig), "--volume-dir", str(volume)],
                logs / "executor.log",
            )
        )
        print(
            f"\nready. In another shell:\n"
            f"  export KUBECONFIG={kubeconfig}\n"
            f"  kubectl apply -f examples/tiny.yaml      # needs --tiny-assets on this command\n"
            f"  kubectl get rlhfrun -w\n"
            f"kubectl: {plane.bin_dir / 'kubectl'}   volume: {volume}   logs: {logs}\n"
            f"Ctrl-C stops everything."
        )
        while all(p.poll() is None for p in processes):
            time.sleep(1)
        print("a component exited; see the logs in", logs, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for proc in processes:
            proc.terminate()
        for proc in processes:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        plane.stop()
