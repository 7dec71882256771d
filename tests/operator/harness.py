"""Helpers for the integration tests: the operator and the local kubelet as real processes."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhf_operator.dev.controlplane import ControlPlane, free_port
from tests.pythonpath import python_env

REPO = Path(__file__).resolve().parents[2]
FAKE_STAGES = Path(__file__).resolve().parent / "fakestages"


@dataclass
class Process:
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind (no lease release, nothing flushed)."""
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait()

    def stop(self) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _spawn(argv: list[str], log: Path) -> Process:
    out = log.open("ab")
    return Process(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=python_env()), log)


@dataclass
class Env:
    """One test's world: a namespace, a local volume, a local kubelet, and operators started on demand."""

    plane: ControlPlane
    namespace: str
    root: Path
    processes: list[Process] = field(default_factory=list)

    @property
    def volume(self) -> Path:
        return self.root / "volume"

    def kubectl(self, *args: str, **kw: Any) -> str:
        return self.plane.kubectl("-n", self.namespace, *args, **kw)

    def start_kubelet(self, fake: bool = True) -> Process:
        self.volume.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable,
            "-m",
            "rlhf_operator.dev.local_kubelet",
            "--kubeconfig",
            str(self.plane.kubeconfig()),
            "--volume-dir",
            str(self.volume),
            "--work-dir",
            str(self.root / "pods"),
            "--namespace",
            self.namespace,
            "--grace-seconds",
            "10",
        ]
        if fake:
            argv += ["--python-path", str(FAKE_STAGES)]
        proc = _spawn(argv, self.root / "local-kubelet.log")
        self.processes.append(proc)
        return proc

    def start_operator(
        self, identity: str = "op-a", lease_duration: float = 3.0, kubeconfig: Path | None = None
    ) -> tuple[Process, int]:
        """``kubeconfig``: another way to the API server than the control plane's own (a proxy)."""
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "rlhf_operator",
            "run",
            "--namespace",
            self.namespace,
            "--kubeconfig",
            str(kubeconfig or self.plane.kubeconfig(self.plane.operator)),
            "--identity",
            identity,
            "--lease-name",
            f"lease-{self.namespace}"[:63],
            "--lease-duration",
            str(lease_duration),
            "--health-host",
            "127.0.0.1",
            "--health-port",
            str(port),
            "--resync",
            "2",
            "--workers",
            "2",
        ]
        proc = _spawn(argv, self.root / f"operator-{identity}.log")
        self.processes.append(proc)
        return proc, port

    def fake_behaviour(self, behaviour: dict[str, Any]) -> None:
        self.volume.mkdir(parents=True, exist_ok=True)
        (self.volume / "fake-stages.json").write_text(json.dumps(behaviour))

    def run_dir(self, name: str) -> Path:
        return self.volume / "runs" / self.namespace / name

    def starts(self, name: str) -> list[str]:
        log = self.run_dir(name) / "fake-starts.log"
        return log.read_text().split("\n")[:-1] if log.exists() else []

    def apply(self, manifest: dict[str, Any]) -> str:
        return self.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        out = self.kubectl("get", kind, name, "-o", "json", "--ignore-not-found")
        return json.loads(out) if out.strip() else None

    def items(self, kind: str, selector: str | None = None) -> list[dict[str, Any]]:
        args = ["get", kind, "-o", "json"] + (["-l", selector] if selector else [])
        return list(json.loads(self.kubectl(*args))["items"])

    def run(self, name: str) -> dict[str, Any]:
        run = self.get("rlhfrun", name)
        assert run is not None
        return run

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float = 120.0, every: float = 0.5) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(every)
        logs = "\n".join(f"--- {p.log.name}\n{p.text()[-4000:]}" for p in self.processes)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{logs}")

    def wait_phase(self, name: str, phase: str, timeout: float = 120.0) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            run = self.run(name)
            current = (run.get("status") or {}).get("phase")
            if phase == "Succeeded" and current == "Failed":  # final: waiting longer cannot help
                failed = [c for c in run["status"]["conditions"] if c["type"] == "Failed"]
                raise AssertionError(f"{name} failed instead of succeeding: {failed}")
            return run if current == phase else None

        return self.wait_for(f"{name} phase {phase}", check, timeout)  # type: ignore[no-any-return]

    def stage(self, run: dict[str, Any], stage: str) -> dict[str, Any]:
        return next((s for s in (run.get("status") or {}).get("stages") or [] if s["name"] == stage), {})

    def events(self, name: str) -> list[str]:
        items = self.items("events")
        return [
            e["reason"]
            for e in items
            if e["involvedObject"]["name"] == name and e["involvedObject"]["kind"] == "RLHFRun"
        ]

    def wait_events(self, name: str, *reasons: str, timeout: float = 30.0) -> list[str]:
        """The run's event reasons once each of ``reasons`` is among them (as often as it is listed):
        the operator posts events from a queue of their own, moments after the status they tell of."""
        needed = {r: reasons.count(r) for r in reasons}

        def check() -> list[str] | None:
            events = self.events(name)
            return events if all(events.count(r) >= n for r, n in needed.items()) else None

        return self.wait_for(f"events {', '.join(reasons)} of {name}", check, timeout)

    def stop_all(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def tiny_run(name: str = "tiny", **spec_changes: Any) -> dict[str, Any]:
    """examples/tiny.yaml (the real quickstart run), renamed and adjusted."""
    manifest = yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text())
    manifest = copy.deepcopy(manifest)
    manifest["metadata"]["name"] = name
    for key, value in spec_changes.items():
        manifest["spec"][key] = value
    return manifest
