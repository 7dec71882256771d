"""Dev/test only: a stand-in Job controller and kubelet for the test control plane (never shipped).

``python -m rlhf_operator.dev.local_kubelet --kubeconfig K --volume-dir DIR`` watches (polls) the Jobs the
operator manages and, for each, creates Pods and runs their container as a local process
(``dev/process.py``), writing Job and Pod status as the Job controller and the kubelet would:
suspend (the pod is terminated and deleted, it does not count as failed; resume starts a new one and
resets startTime), backoffLimit (``BackoffLimitExceeded``), activeDeadlineSeconds
(``DeadlineExceeded``), podFailurePolicy (FailJob on exit codes: ``PodFailurePolicy``),
ttlSecondsAfterFinished, and the conditions FailureTarget/Failed, SuccessCriteriaMet/Complete,
Suspended. An Indexed Job of N completions (a multi-node stage's gang) runs N local Pods at once, each
with its index (label and ``JOB_COMPLETION_INDEX``) and the gang's rendezvous on this machine: the
Service's host env var points at 127.0.0.1 and every gang gets its own free port; the Job completes
when all N succeeded and fails at the first failed Pod (the operator sets backoffLimit 0 for gangs),
its other Pods then stopped, as the Job controller does.

On SIGTERM or SIGINT it stops like a node going away: its running containers get
SIGTERM, then SIGKILL after ``--grace-seconds``.

Live progress: on a real cluster the operator reads it from the stage container's log (the stage's
``rlhf-progress {...}`` lines, through ``get pods/log``). This stand-in runs no containers, so its pods
have no logs (nor a ``nodeName``, so the operator does not try); instead it copies a running stage's
progress file into the Pod's ``rlhf-operator.io/progress`` annotation, which the operator parses with
the same function. That annotation is this test transport only (docs/operator.md "Live progress").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import signal
import string
import subprocess
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from rlhf_api.layout import (
    JOB_COMPLETION_INDEX_ENV,
    RENDEZVOUS_PORT_ENV,
    RENDEZVOUS_SERVICE_ENV,
    run_dir,
    service_host_env,
    stage_progress_file,
)
from rlhf_api.names import (
    CONTROLLER_UID_LABEL,
    JOB_COMPLETION_INDEX_LABEL,
    JOB_NAME_LABEL,
    LABEL_MANAGED_BY,
    LABEL_RUN,
    LABEL_STAGE,
    LEGACY_CONTROLLER_UID_LABEL,
    LEGACY_JOB_NAME_LABEL,
    MANAGER,
    PROGRESS_ANNOTATION,
)
from rlhf_api.timestamps import format_timestamp, parse_timestamp

from .controlplane import free_port
from .process import LocalProcess, launch

log = logging.getLogger("rlhf-local-kubelet")


def _now() -> datetime:
    return datetime.now(UTC)


def _cond(status: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), None)


def _set_cond(status: dict[str, Any], kind: str, value: str, reason: str, message: str) -> None:
    now = format_timestamp()
    existing = _cond(status, kind)
    if existing is None:
        status.setdefault("conditions", []).append(
            {
                "type": kind,
                "status": value,
                "reason": reason,
                "message": message,
                "lastProbeTime": now,
                "lastTransitionTime": now,
            }
        )
    elif (existing["status"], existing.get("reason")) != (value, reason):
        existing.update(status=value, reason=reason, message=message, lastProbeTime=now, lastTransitionTime=now)


def _finished(status: dict[str, Any]) -> bool:
    return any((_cond(status, k) or {}).get("status") == "True" for k in ("Complete", "Failed"))


def split_exited(procs: list[LocalProcess]) -> tuple[list[LocalProcess], list[LocalProcess]]:
    """(exited, running), looking at each process once. Two looks (one for "running", one for "exited")
    let a Pod that exits between them count as both: a gang whose last Pod succeeded just then was
    Complete with that Pod still listed as running, and deleted as a straggler after its success."""
    exited: list[LocalProcess] = []
    running: list[LocalProcess] = []
    for proc in procs:
        (running if proc.poll() is None else exited).append(proc)
    return exited, running


def _json(resp: Any) -> dict[str, Any]:
    """The decoded body of a ``_preload_content=False`` response (typed by the client as the model)."""
    return json.loads(resp.data)


def _body(manifest: Mapping[str, Any]) -> Any:
    """A plain-dict manifest as a request body: the client sends dicts as they are (its hints name only models)."""
    return manifest


class DevJobController:
    def __init__(
        self,
        api: client.ApiClient,
        volume_dir: Path,
        work_dir: Path,
        python_path: list[str],
        backoff_seconds: float = 1.0,
        grace_seconds: float = 20.0,
        namespace: str | None = None,
    ) -> None:
        self.namespace = namespace
        self.core, self.batch = client.CoreV1Api(api), client.BatchV1Api(api)
        self.volume_dir, self.work_dir, self.python_path = volume_dir, work_dir, python_path
        self.backoff_seconds, self.grace_seconds = backoff_seconds, grace_seconds
        self.procs: dict[str, list[LocalProcess]] = {}  # a Job's running Pods (a gang's: index order), by Job uid
        self.last_failure: dict[str, float] = {}
        self.progress_seen: dict[str, float] = {}

    # --- reads used by process.launch ---------------------------------------------------------
    def read(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        call = self.core.read_namespaced_secret if kind == "secret" else self.core.read_namespaced_config_map
        return _json(call(name, namespace, _preload_content=False))

    # --- the loop ------------------------------------------------------------------------------
    def run_forever(self, poll: float) -> None:
        while True:
            try:
                self.sync_all()
            except Exception:
                log.exception("sync failed")
            time.sleep(poll)

    def shutdown(self) -> None:
        """The node going away: SIGTERM every running container, SIGKILL what outlives the grace period.

        Containers run in their own sessions, so without this they would outlive the local kubelet.
        """
        procs = [proc for pods in self.procs.values() for proc in pods if proc.poll() is None]
        self.procs.clear()
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_seconds
        for proc in procs:
            try:
                proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait()
            log.info("stopped pod %s/%s (exit %s)", proc.namespace, proc.pod, proc.popen.returncode)

    def sync_all(self) -> None:
        selector = f"{LABEL_MANAGED_BY}={MANAGER}"
        if self.namespace:
            resp = self.batch.list_namespaced_job(self.namespace, label_selector=selector, _preload_content=False)
        else:
            resp = self.batch.list_job_for_all_namespaces(label_selector=selector, _preload_content=False)
        jobs = _json(resp).get("items") or []
        live = {j["metadata"]["uid"] for j in jobs}
        for uid in [u for u in self.procs if u not in live]:  # the Job was deleted: kill its pods
            for proc in self.procs.pop(uid):
                log.info("job of %s/%s deleted: terminating", proc.namespace, proc.pod)
                proc.terminate(self.grace_seconds)
        self._finish_pod_deletions(selector)
        for job in jobs:
            try:
                self.sync(job)
            except ApiException as exc:
                if exc.status not in (404, 409):  # gone, or changed under us: next poll
                    raise

    def sync(self, job: dict[str, Any]) -> None:
        meta, spec = job["metadata"], job["spec"]
        status = dict(job.get("status") or {})
        uid = meta["uid"]
        procs = self.procs.get(uid, [])
        if _finished(status):
            self._expire(job, status)
            return
        before = json.dumps(status, sort_keys=True)
        if spec.get("suspend"):
            for proc in self.procs.pop(uid, []):  # suspending deletes the active pods; not counted as failures
                proc.terminate(self.grace_seconds)
                self._delete_pod(proc)
            status.update(active=0, ready=0)
            status.pop("startTime", None)
            _set_cond(status, "Suspended", "True", "JobSuspended", "Job suspended")
            self._write(job, status, before)
            return
        if (_cond(status, "Suspended") or {}).get("status") == "True":
            _set_cond(status, "Suspended", "False", "JobResumed", "Job resumed")
            status["startTime"] = format_timestamp()  # resuming restarts the activeDeadlineSeconds clock
        status.setdefault("startTime", format_timestamp())
        deadline, started = spec.get("activeDeadlineSeconds"), parse_timestamp(status["startTime"])
        if deadline and started is not None and _now() > started + timedelta(seconds=deadline):
            for proc in self.procs.pop(uid, []):
                proc.terminate(self.grace_seconds)
                self._pod_terminated(proc, 143, "DeadlineExceeded")
            self._fail(status, "DeadlineExceeded", "Job was active longer than specified deadline")
        elif procs:
            self._observe(job, status, procs)
        else:
            self._maybe_start(job, status)
        self._write(job, status, before)

    def _observe(self, job: dict[str, Any], status: dict[str, Any], procs: list[LocalProcess]) -> None:
        """The Job's running Pods: count those that exited; a failed Job stops the rest."""
        uid = job["metadata"]["uid"]
        exited, running = split_exited(procs)
        for proc in exited:
            self._exited(job, status, proc)
        if running and _finished(status):  # a gang's Pod failed: the Job controller deletes the others
            for proc in running:
                proc.terminate(self.grace_seconds)
                self._delete_pod(proc)
            running = []
        if running:
            self.procs[uid] = running
            self._report_progress(job, running[0])  # node 0 while it runs: its progress is the stage's
            status.update(active=len(running), ready=len(running))
        else:
            self.procs.pop(uid, None)

    def _finish_pod_deletions(self, selector: str) -> None:
        """The kubelet's part of a graceful pod deletion: stop the containers, then remove the pod."""
        if self.namespace:
            resp = self.core.list_namespaced_pod(self.namespace, label_selector=selector, _preload_content=False)
        else:
            resp = self.core.list_pod_for_all_namespaces(label_selector=selector, _preload_content=False)
        for pod in _json(resp).get("items") or []:
            meta = pod["metadata"]
            if not meta.get("deletionTimestamp"):
                continue
            for uid, procs in list(self.procs.items()):
                for proc in [p for p in procs if (p.namespace, p.pod) == (meta["namespace"], meta["name"])]:
                    procs.remove(proc)
                    proc.terminate(self.grace_seconds)
                if not procs:
                    self.procs.pop(uid)
            try:
                self.core.delete_namespaced_pod(meta["name"], meta["namespace"], grace_period_seconds=0)
            except ApiException as exc:
                if exc.status != 404:
                    raise

    # --- transitions ---------------------------------------------------------------------------
    def _exited(self, job: dict[str, Any], status: dict[str, Any], proc: LocalProcess) -> None:
        code = int(proc.popen.returncode)
        self._pod_terminated(proc, code, "Completed" if code == 0 else "Error")
        status.update(active=0, ready=0)
        if code == 0:
            status["succeeded"] = int(status.get("succeeded") or 0) + 1
            if status["succeeded"] < int(job["spec"].get("completions") or 1):
                return  # a gang: complete when every index succeeded
            _set_cond(
                status, "SuccessCriteriaMet", "True", "CompletionsReached", "Reached expected number of succeeded pods"
            )
            _set_cond(status, "Complete", "True", "CompletionsReached", "Reached expected number of succeeded pods")
            status["completionTime"] = format_timestamp()
            return
        status["failed"] = int(status.get("failed") or 0) + 1
        self.last_failure[job["metadata"]["uid"]] = time.monotonic()
        for index, rule in enumerate((job["spec"].get("podFailurePolicy") or {}).get("rules") or []):
            codes = rule.get("onExitCodes")
            if codes and (code in codes["values"]) == (codes.get("operator", "In") == "In"):
                if rule["action"] == "FailJob":
                    message = (
                        f"Container stage for pod {proc.namespace}/{proc.pod} failed with exit code {code} "
                        f"matching FailJob rule at index {index}"
                    )
                    self._fail(status, "PodFailurePolicy", message)
                    return
                if rule["action"] == "Ignore":
                    status["failed"] -= 1
                    return
                break
        if status["failed"] > int(job["spec"].get("backoffLimit", 6)):
            self._fail(status, "BackoffLimitExceeded", "Job has reached the specified backoff limit")

    def _fail(self, status: dict[str, Any], reason: str, message: str) -> None:
        status.update(active=0, ready=0)
        _set_cond(status, "FailureTarget", "True", reason, message)
        _set_cond(status, "Failed", "True", reason, message)

    def _maybe_start(self, job: dict[str, Any], status: dict[str, Any]) -> None:
        uid = job["metadata"]["uid"]
        if status.get("failed") and time.monotonic() - self.last_failure.get(uid, 0) < self.backoff_seconds:
            return  # the Job controller's retry back-off (shortened for tests)
        completions = int(job["spec"].get("completions") or 1)
        indexed = job["spec"].get("completionMode") == "Indexed"
        gang_env = self._gang_env(job) if completions > 1 else {}
        self.procs[uid] = []
        for index in range(completions):
            pod = self._create_pod(job, index if indexed else None)
            extra = {**gang_env, JOB_COMPLETION_INDEX_ENV: str(index)} if indexed else gang_env
            self.procs[uid].append(launch(pod, self.work_dir, self.volume_dir, self.read, self.python_path, extra))
            self._patch_pod_status(
                pod["metadata"]["namespace"],
                pod["metadata"]["name"],
                {
                    "phase": "Running",
                    "startTime": format_timestamp(),
                    "containerStatuses": [
                        self._container_status(pod, {"running": {"startedAt": format_timestamp()}}, ready=True)
                    ],
                },
            )
            log.info("started pod %s/%s", pod["metadata"]["namespace"], pod["metadata"]["name"])
        status.update(active=completions, ready=0)

    @staticmethod
    def _gang_env(job: dict[str, Any]) -> dict[str, str]:
        """Node 0 of a gang on this machine: the rendezvous Service's host env var (which the kubelet
        sets for a Service of the namespace) at 127.0.0.1, and a port of its own, so gangs of several
        runs never meet on one port."""
        container = job["spec"]["template"]["spec"]["containers"][0]
        env = {var["name"]: var.get("value") for var in container.get("env") or []}
        out = {RENDEZVOUS_PORT_ENV: str(free_port())}
        service = env.get(RENDEZVOUS_SERVICE_ENV)
        if service:
            out[service_host_env(service)] = "127.0.0.1"
        return out

    def _expire(self, job: dict[str, Any], status: dict[str, Any]) -> None:
        """ttlSecondsAfterFinished: the TTL-after-finished controller's job."""
        ttl = job["spec"].get("ttlSecondsAfterFinished")
        done = parse_timestamp(
            status.get("completionTime") or (_cond(status, "Failed") or {}).get("lastTransitionTime")
        )
        if ttl is not None and done is not None and _now() >= done + timedelta(seconds=ttl):
            self.batch.delete_namespaced_job(
                job["metadata"]["name"], job["metadata"]["namespace"], propagation_policy="Background"
            )

    # --- API writes ----------------------------------------------------------------------------
    def _write(self, job: dict[str, Any], status: dict[str, Any], before: str) -> None:
        if json.dumps(status, sort_keys=True) == before:
            return
        body = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": job["metadata"],
            "spec": job["spec"],
            "status": status,
        }
        self.batch.replace_namespaced_job_status(job["metadata"]["name"], job["metadata"]["namespace"], _body(body))

    def _create_pod(self, job: dict[str, Any], index: int | None = None) -> dict[str, Any]:
        meta, template = job["metadata"], job["spec"]["template"]
        suffix = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(5))
        name = f"{meta['name']}-{suffix}" if index is None else f"{meta['name']}-{index}-{suffix}"
        labels = dict((template.get("metadata") or {}).get("labels") or {})
        annotations = dict((template.get("metadata") or {}).get("annotations") or {})
        if index is not None:  # as the Job controller marks an Indexed Job's Pods
            labels[JOB_COMPLETION_INDEX_LABEL] = annotations[JOB_COMPLETION_INDEX_LABEL] = str(index)
        labels.update(
            {
                CONTROLLER_UID_LABEL: meta["uid"],
                JOB_NAME_LABEL: meta["name"],
                LEGACY_CONTROLLER_UID_LABEL: meta["uid"],
                LEGACY_JOB_NAME_LABEL: meta["name"],
            }
        )
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": meta["namespace"],
                "labels": labels,
                # As the Job controller does: the stage's config arrives as one (a downwardAPI file).
                "annotations": annotations,
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": template["spec"],
        }
        return _json(self.core.create_namespaced_pod(meta["namespace"], _body(body), _preload_content=False))

    def _container_status(self, pod: dict[str, Any], state: dict[str, Any], ready: bool) -> dict[str, Any]:
        container = pod["spec"]["containers"][0]
        return {
            "name": container["name"],
            "image": container["image"],
            "imageID": "",
            "ready": ready,
            "restartCount": 0,
            "started": ready,
            "state": state,
        }

    def _patch_pod_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.core.patch_namespaced_pod_status(name, namespace, {"status": status})

    def _pod_terminated(self, proc: LocalProcess, code: int, reason: str) -> None:
        pod = {"spec": {"containers": [{"name": "stage", "image": ""}]}}
        try:
            pod = _json(self.core.read_namespaced_pod(proc.pod, proc.namespace, _preload_content=False))
        except ApiException:
            return
        terminated = {
            "exitCode": code,
            "reason": reason,
            "message": proc.termination_message(),
            "startedAt": format_timestamp(datetime.fromtimestamp(proc.started, UTC)),
            "finishedAt": format_timestamp(),
        }
        self._patch_pod_status(
            proc.namespace,
            proc.pod,
            {
                "phase": "Succeeded" if code == 0 else "Failed",
                "containerStatuses": [self._container_status(pod, {"terminated": terminated}, ready=False)],
            },
        )

    def _delete_pod(self, proc: LocalProcess) -> None:
        try:
            self.core.delete_namespaced_pod(proc.pod, proc.namespace, grace_period_seconds=0)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def _report_progress(self, job: dict[str, Any], proc: LocalProcess) -> None:
        labels = job["metadata"].get("labels") or {}
        run, stage = labels.get(LABEL_RUN), labels.get(LABEL_STAGE)
        if not run or not stage:
            return
        path = self.volume_dir / stage_progress_file(run_dir(proc.namespace, run), stage)
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return
        if self.progress_seen.get(proc.pod) == mtime:
            return
        self.progress_seen[proc.pod] = mtime
        text = path.read_text()
        self.core.patch_namespaced_pod(
            proc.pod, proc.namespace, {"metadata": {"annotations": {PROGRESS_ANNOTATION: text}}}
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rlhf_operator.dev.local_kubelet", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--volume-dir", required=True, type=Path, help="local directory standing in for every PVC")
    parser.add_argument("--work-dir", type=Path, help="pod directories and logs (default: <volume-dir>/../pods)")
    parser.add_argument(
        "--python-path",
        action="append",
        default=[],
        help="test only: extra PYTHONPATH entries put before the repo's (e.g. fake stages)",
    )
    parser.add_argument("--namespace", help="only run Jobs in this namespace (default: all)")
    parser.add_argument("--poll", type=float, default=0.3)
    parser.add_argument("--backoff-seconds", type=float, default=1.0)
    parser.add_argument("--grace-seconds", type=float, default=20.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api = config.new_client_from_config(config_file=args.kubeconfig)
    work_dir = args.work_dir or args.volume_dir.parent / "pods"
    controller = DevJobController(
        api,
        args.volume_dir.resolve(),
        work_dir.resolve(),
        args.python_path,
        args.backoff_seconds,
        args.grace_seconds,
        args.namespace,
    )
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        controller.run_forever(args.poll)
    except KeyboardInterrupt:
        log.info("stopping: terminating %d running pod(s)", len(controller.procs))
    finally:
        # A second signal must not cut the shutdown short: the containers would be left running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        controller.shutdown()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    raise SystemExit(main())
