"""``rlhfctl dev`` as a user runs it: a real control plane, the operator and the local kubelet.

The stages are the fast fake ones (``--stage-python-path``), so a whole run takes seconds. The test
applies runs with the kubeconfig ``dev`` prints, then stops it the way a user or a service manager
would, and checks that nothing it started (etcd, kube-apiserver, the controller manager, the
operator, the local kubelet, a running stage) outlives it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.pythonpath import python_env

pytestmark = pytest.mark.controlplane

REPO = Path(__file__).resolve().parents[2]
FAKE_STAGES = REPO / "tests" / "operator" / "fakestages"


def _processes_of(workdir: Path) -> dict[int, str]:
    """Every live process whose command line or working directory is inside ``workdir``."""
    found: dict[int, str] = {}
    marker = str(workdir)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            cwd = os.readlink(entry / "cwd")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # exited meanwhile, or not ours to read
            continue
        if state != "Z" and (marker in cmdline or cwd == marker or cwd.startswith(marker + os.sep)):
            found[int(entry.name)] = cmdline
    return found


def _kill_leftovers(workdir: Path) -> None:
    for pid in _processes_of(workdir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Dev:
    """``rlhfctl dev`` in its own process group, as a shell runs a foreground command."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.stderr = workdir.parent / "dev.stderr"
        self.popen = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rlhf_operator.cli",
                "dev",
                "--workdir",
                str(workdir),
                "--stage-python-path",
                str(FAKE_STAGES),
            ],
            stdout=subprocess.PIPE,
            stderr=self.stderr.open("wb"),
            stdin=subprocess.DEVNULL,
            env=python_env(),
            cwd=workdir.parent,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def output(self) -> str:
        stderr = self.stderr.read_text(errors="replace") if self.stderr.exists() else ""
        logs = ""
        for log in sorted((self.workdir / "logs").glob("*.log")):
            logs += f"\n--- {log.name}\n{log.read_text(errors='replace')[-3000:]}"
        return "\n".join(self.lines) + f"\n--- stderr\n{stderr[-3000:]}{logs}"

    def wait_ready(self, timeout: float) -> tuple[Path, Path]:
        """The kubeconfig and kubectl that ``dev`` tells the user to use."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            exports = [line for line in self.lines if line.strip().startswith("export KUBECONFIG=")]
            tools = [line for line in self.lines if line.startswith("kubectl: ")]
            if exports and tools:
                kubeconfig = Path(exports[0].strip().removeprefix("export KUBECONFIG="))
                kubectl = Path(tools[0].removeprefix("kubectl: ").split()[0])
                return kubeconfig, kubectl
            if self.popen.poll() is not None:
                raise AssertionError(f"rlhfctl dev exited with {self.popen.returncode}:\n{self.output()}")
            time.sleep(0.2)
        raise AssertionError(f"rlhfctl dev printed no kubeconfig within {timeout:.0f}s:\n{self.output()}")


def _wait_for(what: str, check: Callable[[], Any], dev: Dev, timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if dev.popen.poll() is not None:
            raise AssertionError(f"rlhfctl dev exited with {dev.popen.returncode} waiting for {what}:\n{dev.output()}")
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}:\n{dev.output()}")


def _run_manifest(name: str) -> str:
    manifest = yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text())
    manifest["metadata"]["name"] = name
    return yaml.safe_dump(manifest)


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_dev_runs_a_pipeline_and_stops_everything(tmp_path: Path, stop: str) -> None:
    workdir = tmp_path / "dev"
    dev = Dev(workdir)
    try:
        kubeconfig, kubectl_bin = dev.wait_ready(timeout=300)
        assert kubeconfig == workdir / "kubeconfig" and kubeconfig.exists()

        def kubectl(*args: str, input: str | None = None) -> str:
            proc = subprocess.run(
                [str(kubectl_bin), *args],
                input=input,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
                env={**os.environ, "KUBECONFIG": str(kubeconfig)},
            )
            assert proc.returncode == 0, f"kubectl {' '.join(args)}: {proc.stderr}\n{dev.output()}"
            return proc.stdout

        def status(name: str) -> dict[str, Any]:
            return dict(json.loads(kubectl("get", "rlhfrun", name, "-o", "json")).get("status") or {})

        runs = workdir / "volume" / "runs" / "default"

        # A whole (fake) pipeline: the operator creates each stage's Job, the local kubelet runs it.
        kubectl("apply", "-f", "-", input=_run_manifest("quick"))
        _wait_for("run quick to succeed", lambda: status("quick").get("phase") == "Succeeded", dev)
        done = status("quick")
        assert [s["phase"] for s in done["stages"]] == ["Succeeded"] * 4
        assert {c["type"]: c["status"] for c in done["conditions"]}["Succeeded"] == "True"
        jobs = json.loads(kubectl("get", "jobs", "-o", "json"))["items"]
        assert {j["metadata"]["name"] for j in jobs} >= {"quick-sft", "quick-reward", "quick-ppo", "quick-merge"}
        assert (runs / "quick" / "fake-starts.log").read_text().split() == [
            "sft", "0", "reward", "0", "ppo", "0", "merge", "0",
        ]  # fmt: skip

        # A run whose first stage is still training when dev is stopped.
        (workdir / "volume" / "fake-stages.json").write_text(json.dumps({"sft": {"steps": 100000}}))
        kubectl("apply", "-f", "-", input=_run_manifest("busy"))
        _wait_for(
            "run busy's sft stage to run",
            lambda: (runs / "busy" / "fake-starts.log").exists() and status("busy").get("phase") == "Running",
            dev,
        )

        running = _processes_of(workdir)
        names = " ".join(running.values())
        for component in (
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "rlhf_operator run",
            "rlhf_operator.dev.local_kubelet",
            "rlhf_stages sft",
        ):
            assert component in names, f"{component} not found among {running}"

        if stop == "ctrl-c":  # the terminal sends SIGINT to the whole foreground process group
            os.killpg(dev.popen.pid, signal.SIGINT)
        else:  # a service manager, or `kill`: the signal reaches dev only
            dev.popen.send_signal(signal.SIGTERM)
        try:
            code = dev.popen.wait(timeout=90)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"rlhfctl dev still running 90 s after {stop}:\n{dev.output()}") from None
        assert code == 0, dev.output()
        assert _processes_of(workdir) == {}, dev.output()
        for log in ("operator.log", "local-kubelet.log"):  # stopped, not crashed
            text = (workdir / "logs" / log).read_text()
            assert "Traceback" not in text and " ERROR " not in text, dev.output()
        # The stage was stopped like a pod, not killed: it had time to checkpoint.
        assert list((runs / "busy" / "sft.checkpoints").glob("checkpoint-*")), dev.output()
    finally:
        if dev.popen.poll() is None:
            dev.popen.send_signal(signal.SIGTERM)
            try:
                dev.popen.wait(timeout=60)
            except subprocess.TimeoutExpired:
                dev.popen.kill()
        _kill_leftovers(workdir)
