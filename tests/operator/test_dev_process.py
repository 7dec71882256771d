"""The local kubelet's kubelet stand-in (dev/process.py): container paths map to local volumes, host paths do not."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from rlhf_operator.dev.process import launch

# Writes its first argument's path into that file: shows where a container path landed.
SCRIPT = "import sys; open(sys.argv[1], 'w').write(sys.argv[1])"


def _pod(mount_path: str) -> dict[str, Any]:
    # Like every stage Pod (children.py): an emptyDir at /tmp, because the root filesystem is read-only.
    container = {
        "name": "stage",
        "image": "stages",
        "command": ["python", "-c", SCRIPT],
        "args": [f"{mount_path}/scratch"],
        "volumeMounts": [{"name": "tmp", "mountPath": mount_path}],
    }
    return {
        "metadata": {"name": "pod", "namespace": "ns"},
        "spec": {"volumes": [{"name": "tmp", "emptyDir": {}}], "containers": [container]},
    }


def test_interpreter_under_the_tmp_mount_path_is_not_mapped_into_the_pod(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkout under /tmp with its .venv: the Pod's /tmp emptyDir must not capture the interpreter.

    It did: ``python`` became the host interpreter before the container paths were rewritten, so
    /tmp/<clone>/.venv/bin/python turned into <pod dir>/volumes/tmp/<clone>/.venv/bin/python.
    """
    # "/tmp" with pytest's default base temp; whatever the top directory is, the interpreter is under it.
    mount_path = "/" + tmp_path.parts[1]
    venv_bin = tmp_path / "checkout" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").symlink_to(sys.executable)
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))

    proc = launch(_pod(mount_path), tmp_path / "pods", tmp_path / "volume", read=None)

    assert proc.popen.wait(timeout=60) == 0, proc.log_file.read_text()
    assert proc.popen.args[0] == str(venv_bin / "python")  # type: ignore[index]
    # The container's own /tmp path still lands in the pod's emptyDir.
    scratch = proc.pod_dir / "volumes" / "tmp" / "scratch"
    assert scratch.read_text() == str(scratch)


def test_the_stage_config_annotation_becomes_the_config_file(tmp_path: Path) -> None:
    """The local kubelet implements the downwardAPI volume the stage config comes through (children.py),
    with the invocation's workspace pointed at the local volume as for any mounted invocation."""
    annotation = "rlhf-operator.io/invocation"
    item = {"path": "invocation.yaml", "fieldRef": {"fieldPath": f"metadata.annotations['{annotation}']"}}
    pod = _pod("/tmp")
    pod["metadata"]["annotations"] = {annotation: "kind: StageInvocation\nstage: sft\nworkspace: /workspace\n"}
    pod["spec"]["volumes"].append({"name": "config", "downwardAPI": {"items": [item]}})
    container = pod["spec"]["containers"][0]
    container["volumeMounts"].append({"name": "config", "mountPath": "/etc/rlhf", "readOnly": True})
    container["command"] = ["python", "-c", "import shutil, sys; shutil.copy(sys.argv[1], sys.argv[2])"]
    container["args"] = ["/etc/rlhf/invocation.yaml", "/tmp/copy.yaml"]

    proc = launch(pod, tmp_path / "pods", tmp_path / "volume", read=None)

    assert proc.popen.wait(timeout=60) == 0, proc.log_file.read_text()
    copied = (proc.pod_dir / "volumes" / "tmp" / "copy.yaml").read_text()
    assert "stage: sft" in copied and f"workspace: {tmp_path / 'volume'}" in copied


def test_only_thread_counts_and_basics_pass_from_the_host_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local Pod sees the host's OMP_NUM_THREADS (several local Pods share the machine's cores) but,
    as under a kubelet, none of the host's other variables, such as a credential in the shell."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("RLHF_TEST_HOST_SECRET", "hunter2")
    pod = _pod("/scratch")
    pod["spec"]["containers"][0]["command"] = [
        "python",
        "-c",
        "import json, os, sys; open(sys.argv[1], 'w').write(json.dumps(dict(os.environ)))",
    ]

    proc = launch(pod, tmp_path / "pods", tmp_path / "volume", read=None)

    assert proc.popen.wait(timeout=60) == 0, proc.log_file.read_text()
    seen = json.loads((proc.pod_dir / "volumes" / "tmp" / "scratch").read_text())
    assert seen["OMP_NUM_THREADS"] == "1"
    assert "RLHF_TEST_HOST_SECRET" not in seen


class _ExitsBetweenLooks:
    """A fake process (a real one cannot be made to exit at an exact instant): running at its first
    look, exited (code 0) at every later one, as a gang's last Pod finishing mid-sync."""

    def __init__(self) -> None:
        self.looks = 0

    def poll(self) -> int | None:
        self.looks += 1
        return None if self.looks == 1 else 0


def test_a_pod_exiting_mid_sync_is_either_running_or_exited_never_both() -> None:
    """The tiny pipeline's gang once lost its index-1 Pod: it exited between the kubelet's "running"
    look and its "exited" look, so it counted toward the Job's completion and was then deleted as a
    straggler of the finished Job. Each process is looked at once now."""
    from rlhf_operator.dev.local_kubelet import split_exited

    done, racing = _ExitsBetweenLooks(), _ExitsBetweenLooks()
    done.poll()  # exited before this sync
    exited, running = split_exited([done, racing])  # type: ignore[list-item]
    assert exited == [done] and running == [racing]
    assert racing.looks == 1
