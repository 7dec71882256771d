"""Dev/test only: run a Pod's single container as a local process, the way a kubelet would run it.

Volumes become local directories (every PersistentVolumeClaim is the one ``--volume-dir``;
ConfigMaps, Secrets and downwardAPI fields are written out as files; emptyDirs are fresh directories), container paths
in the command, args and env are rewritten to them, and a StageInvocation's ``workspace`` is
pointed at the local volume. The termination log is a local file whose content becomes the
container's termination message. Not shipped: a real cluster runs the image.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhf_api.layout import INVOCATION_KIND, TERMINATION_LOG_ENV, TERMINATION_MESSAGE_LIMIT

REPO = Path(__file__).resolve().parents[3]
# What a local Pod's process takes from this machine's environment (see launch()).
_HOST_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass
class LocalProcess:
    """One container attempt, running."""

    pod: str
    namespace: str
    popen: subprocess.Popen[bytes]
    pod_dir: Path
    log_file: Path
    termination_log: Path
    started: float = field(default_factory=time.time)
    fallback_to_logs: bool = True

    def poll(self) -> int | None:
        return self.popen.poll()

    def terminate(self, grace: float = 20.0) -> int:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds (like a pod deletion)."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        return int(self.popen.returncode)

    def termination_message(self) -> str:
        text = ""
        if self.termination_log.exists():
            text = self.termination_log.read_bytes()[:TERMINATION_MESSAGE_LIMIT].decode("utf-8", "replace")
        if not text.strip() and self.fallback_to_logs and self.popen.returncode not in (0, None):
            # terminationMessagePolicy FallbackToLogsOnError: the log's tail (at most 80 lines).
            lines = self.log_file.read_text(errors="replace").splitlines()[-80:] if self.log_file.exists() else []
            text = "\n".join(lines)[-TERMINATION_MESSAGE_LIMIT:]
        return text


def _rewrite_path(path: str, mounts: list[tuple[str, Path]]) -> str:
    for prefix, local in mounts:  # longest mount path first
        if path == prefix or path.startswith(prefix + "/"):
            return f"{local}{path[len(prefix) :]}"
    return path


def _rewrite(value: str, mounts: list[tuple[str, Path]]) -> str:
    """A container path (or ``--flag=/path``) as the local path it is mounted from."""
    if value.startswith("-") and "=" in value:
        flag, _, path = value.partition("=")
        return f"{flag}={_rewrite_path(path, mounts)}"
    return _rewrite_path(value, mounts)


def _write_text(path: Path, text: str, volume_dir: Path) -> None:
    """A ConfigMap key or downwardAPI field as a file; a StageInvocation's workspace pointed at the local volume."""
    body = yaml.safe_load(text) if path.name.endswith((".yaml", ".yml")) else None
    if isinstance(body, dict) and body.get("kind") == INVOCATION_KIND:
        body["workspace"] = str(volume_dir)  # the stage resolves every spec path against this
        text = yaml.safe_dump(body, sort_keys=True)
    path.write_text(text)


_ANNOTATION_FIELD = re.compile(r"^metadata\.annotations\['([^']+)'\]$")


def _pod_field(pod: dict[str, Any], path: str) -> str | None:
    """A downwardAPI fieldRef of the pod's metadata (its name, namespace, or one annotation)."""
    meta = pod["metadata"]
    annotation = _ANNOTATION_FIELD.match(path)
    if annotation:
        return (meta.get("annotations") or {}).get(annotation.group(1))
    return {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"]}.get(path)


def _materialise(volume: dict[str, Any], target: Path, pod: dict[str, Any], read: Any, volume_dir: Path) -> Path:
    """A pod volume as a local directory (``read(kind, namespace, name)`` fetches ConfigMaps/Secrets)."""
    if "persistentVolumeClaim" in volume:
        return volume_dir
    namespace = pod["metadata"]["namespace"]
    target.mkdir(parents=True, exist_ok=True)
    if "configMap" in volume:
        data = read("configmap", namespace, volume["configMap"]["name"]).get("data") or {}
        for key, text in data.items():
            _write_text(target / key, text, volume_dir)
    elif "downwardAPI" in volume:
        for item in volume["downwardAPI"].get("items") or []:
            value = _pod_field(pod, item["fieldRef"]["fieldPath"])
            _write_text(target / item["path"], value or "", volume_dir)  # the kubelet writes a missing one empty
    elif "secret" in volume:
        data = read("secret", namespace, volume["secret"]["secretName"]).get("data") or {}
        for key, encoded in data.items():
            (target / key).write_bytes(base64.b64decode(encoded))
    return target


def _env_value(var: dict[str, Any], pod: dict[str, Any], read: Any) -> str | None:
    if "value" in var:
        return str(var["value"])
    source = var.get("valueFrom") or {}
    namespace = pod["metadata"]["namespace"]
    if "secretKeyRef" in source:
        ref = source["secretKeyRef"]
        data = read("secret", namespace, ref["name"]).get("data") or {}
        return base64.b64decode(data[ref["key"]]).decode() if ref["key"] in data else None
    if "configMapKeyRef" in source:
        ref = source["configMapKeyRef"]
        return (read("configmap", namespace, ref["name"]).get("data") or {}).get(ref["key"])
    if "fieldRef" in source:
        return _pod_field(pod, source["fieldRef"]["fieldPath"])
    return None


def launch(
    pod: dict[str, Any],
    work_dir: Path,
    volume_dir: Path,
    read: Any,
    python_path: list[str] | None = None,
    extra_env: dict[str, str] | None = None,
) -> LocalProcess:
    """Start the pod's (only) container as a local process group. ``extra_env``: what the cluster would
    have added (a gang's index and where to find its node 0 on this machine)."""
    meta, spec = pod["metadata"], pod["spec"]
    container = spec["containers"][0]
    pod_dir = work_dir / meta["namespace"] / meta["name"]
    pod_dir.mkdir(parents=True, exist_ok=True)
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    mounts: list[tuple[str, Path]] = []
    for mount in container.get("volumeMounts") or []:
        volume = volumes[mount["name"]]
        local = _materialise(volume, pod_dir / "volumes" / mount["name"], pod, read, volume_dir)
        mounts.append((mount["mountPath"].rstrip("/"), local))
    mounts.sort(key=lambda m: len(m[0]), reverse=True)

    # Only the container's own paths are rewritten; the host interpreter goes in afterwards, or a
    # mount such as the /tmp emptyDir would capture a venv that lives under /tmp on this machine.
    argv = [_rewrite(a, mounts) for a in [*(container.get("command") or []), *(container.get("args") or [])]]
    if argv and argv[0] == "python":
        argv[0] = sys.executable
    elif argv and argv[0] == "torchrun":
        argv[:1] = [sys.executable, "-m", "torch.distributed.run"]

    # A kubelet passes none of its own environment; these few keep a local process usable, and the
    # thread counts let a developer (and the tests) size torch's pool for processes that share the
    # machine's cores: with no CPU limit torch takes every core, and several local Pods training at
    # once then spend most of their CPU spinning (benchmarks/thread_oversubscription.py).
    env = {k: v for k, v in os.environ.items() if k in _HOST_ENV}
    for var in container.get("env") or []:
        value = _env_value(var, pod, read)
        if value is not None:
            env[var["name"]] = _rewrite(value, mounts)
    termination_log = pod_dir / "termination-log"
    env[TERMINATION_LOG_ENV] = str(termination_log)
    paths = [*(python_path or []), str(REPO / "operator"), str(REPO / "stages")]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("HOME", str(pod_dir))
    env.update(extra_env or {})
    log_file = pod_dir / "container.log"
    with log_file.open("ab") as out:
        popen = subprocess.Popen(
            argv,
            env=env,
            cwd=pod_dir,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: SIGTERM reaches torchrun's workers too
        )
    return LocalProcess(
        pod=meta["name"],
        namespace=meta["namespace"],
        popen=popen,
        pod_dir=pod_dir,
        log_file=log_file,
        termination_log=termination_log,
        fallback_to_logs=container.get("terminationMessagePolicy") == "FallbackToLogsOnError",
    )
