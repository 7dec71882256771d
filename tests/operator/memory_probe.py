"""The operator's memory with many runs, on a real etcd + kube-apiserver: a measuring script, not a test.

    PYTHONPATH=operator:stages .venv/bin/python -m tests.operator.memory_probe --runs 1000 \
        [--operator-path /work/main/operator]   # another checkout's operator, for a before/after

It builds the world the operator would have left (1,000 runs, ``--running`` of them with their third
stage running, the rest succeeded: each stage's PVC, ConfigMap, Job and Pod as the operator and a
kubelet make them, and each run's status as the operator's own planner writes it), then starts the
operator on it twice (a start, then a restart) and reports each process's peak RSS (VmHWM), the
seconds until /readyz, and the operator's own API requests once it is quiet. The world is made by
running the real reconciler in-process against the API server, with this script as the kubelet.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import client, config

from rlhf_api.layout import StageResult
from rlhf_api.names import CONTROLLER_UID_LABEL, GROUP, LABEL_RUN, PLURAL, VERSION
from rlhf_api.timestamps import format_timestamp
from rlhf_operator.dev import controlplane
from rlhf_operator.kube import Cluster
from rlhf_operator.metrics import Metrics
from rlhf_operator.reconcile import Reconciler
from tests.operator.harness import REPO, http_get, tiny_run
from tests.pythonpath import python_env

NAMESPACE = "load"


class ApiReads:
    """The reconciler's reads straight from the API server (building the world needs no cache)."""

    def __init__(self, api: client.ApiClient) -> None:
        self.custom, self.batch, self.core = client.CustomObjectsApi(api), client.BatchV1Api(api), client.CoreV1Api(api)

    def get_run(self, namespace: str, name: str) -> dict[str, Any] | None:
        resp = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, _preload_content=False)
        return dict(json.loads(resp.data))

    def children(self, namespace: str, run: str, want_pvc: bool) -> tuple[list[dict], list[dict], bool]:
        selector = f"{LABEL_RUN}={run}"
        jobs = json.loads(
            self.batch.list_namespaced_job(namespace, label_selector=selector, _preload_content=False).data
        )
        pods = json.loads(
            self.core.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False).data
        )
        pvc = True
        if want_pvc:
            try:
                self.core.read_namespaced_persistent_volume_claim(f"{run}-workspace", namespace)
            except client.ApiException as exc:
                pvc = exc.status != 404
        return jobs["items"], pods["items"], pvc

    def writing_status(self, before: dict[str, Any], status: dict[str, Any]) -> None:
        pass

    def wrote_run(self, before: dict[str, Any], after: dict[str, Any]) -> None:
        pass

    def creating(self, plural: str, body: dict[str, Any], sent: bool) -> None:
        pass

    def created(self, plural: str, body: dict[str, Any]) -> None:
        pass


def kubelet(api: client.ApiClient, job: dict[str, Any], finish: bool) -> None:
    """One Pod for the Job, running, or finished with the stage's result (and the Job complete)."""
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    meta, template = job["metadata"], job["spec"]["template"]
    labels = {**(template.get("metadata") or {}).get("labels", {}), CONTROLLER_UID_LABEL: meta["uid"]}
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"], "uid": meta["uid"], "controller": True}
    pod_meta = {"name": f"{meta['name']}-x", "namespace": NAMESPACE, "labels": labels, "ownerReferences": [owner]}
    spec = {**template["spec"], "nodeName": "node-1"}
    core.create_namespaced_pod(NAMESPACE, {"apiVersion": "v1", "kind": "Pod", "metadata": pod_meta, "spec": spec})
    now = format_timestamp()
    stage = meta["labels"]["rlhf-operator.io/stage"]
    container = {"name": "stage", "image": spec["containers"][0]["image"], "imageID": "", "ready": not finish}
    if finish:
        artifact = f"runs/{NAMESPACE}/{meta['labels'][LABEL_RUN]}/{stage}"
        result = StageResult(stage=stage, succeeded=True, step=3, total_steps=3, metrics={"loss": 0.3},
                             artifact_path=artifact)  # fmt: skip
        message = json.dumps(result.to_wire())
        container["state"] = {"terminated": {"exitCode": 0, "reason": "Completed", "message": message,
                                             "startedAt": now, "finishedAt": now}}  # fmt: skip
        pod_status: dict[str, Any] = {"phase": "Succeeded", "containerStatuses": [container]}
        done = [
            {"type": t, "status": "True", "reason": "CompletionsReached", "message": "Reached expected number",
             "lastProbeTime": now, "lastTransitionTime": now}
            for t in ("SuccessCriteriaMet", "Complete")
        ]  # fmt: skip
        job_status = {"startTime": now, "completionTime": now, "succeeded": 1, "active": 0, "ready": 0,
                      "conditions": done}  # fmt: skip
    else:
        container["state"] = {"running": {"startedAt": now}}
        pod_status = {"phase": "Running", "startTime": now, "containerStatuses": [container]}
        job_status = {"startTime": now, "active": 1, "ready": 1}
    core.patch_namespaced_pod_status(pod_meta["name"], NAMESPACE, {"status": pod_status})
    body = {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job["spec"], "status": job_status}
    batch.replace_namespaced_job_status(meta["name"], NAMESPACE, body)


def build_run(api: client.ApiClient, index: int, running: bool) -> None:
    name = f"run-{index:05d}"
    client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, tiny_run(name))
    reads = ApiReads(api)
    reconciler = Reconciler(Cluster(api, "probe"), reads, Metrics(), progress_interval=0)  # type: ignore[arg-type]
    started: set[str] = set()
    for _ in range(12):
        reconciler.reconcile(NAMESPACE, name)
        jobs, _pods, _ = reads.children(NAMESPACE, name, want_pvc=False)
        fresh = [j for j in jobs if j["metadata"]["name"] not in started]
        if not fresh:
            phase = ((reads.get_run(NAMESPACE, name) or {}).get("status") or {}).get("phase")
            if phase == "Succeeded" or (running and len(started) == 3):
                return
            continue
        for job in fresh:
            started.add(job["metadata"]["name"])
            kubelet(api, job, finish=not (running and len(started) == 3))
    raise RuntimeError(f"{name} did not settle")


SERVER_FIELDS = ("uid", "resourceVersion", "creationTimestamp", "managedFields", "generation", "selfLink")
JOB_LABELS = (CONTROLLER_UID_LABEL, "controller-uid", "batch.kubernetes.io/job-name", "job-name")


def template(api: client.ApiClient, name: str) -> dict[str, Any]:
    """A run built by the reconciler, and its children, as text to copy (the world is built from copies:
    a run through the reconciler costs ~50 requests and a second of planning, a copy 19 requests)."""
    reads = ApiReads(api)
    jobs, pods, _ = reads.children(NAMESPACE, name, want_pvc=False)
    pvc = client.CoreV1Api(api).read_namespaced_persistent_volume_claim(
        f"{name}-workspace", NAMESPACE, _preload_content=False
    )
    world = {"run": reads.get_run(NAMESPACE, name), "jobs": jobs, "pods": pods, "pvc": json.loads(pvc.data)}
    return {"name": name, "text": json.dumps(world)}


def _fresh(body: dict[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in body["metadata"].items() if k not in SERVER_FIELDS}
    return {**{k: v for k, v in body.items() if k != "status"}, "metadata": meta}


def copy_run(api: client.ApiClient, source: dict[str, Any], index: int) -> None:
    name = f"run-{index:05d}"
    world = json.loads(source["text"].replace(source["name"], name))
    custom, core, batch = client.CustomObjectsApi(api), client.CoreV1Api(api), client.BatchV1Api(api)
    run = custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, _fresh(world["run"]))
    run["status"] = world["run"]["status"]
    custom.replace_namespaced_custom_object_status(GROUP, VERSION, NAMESPACE, PLURAL, name, run)
    pvc = _fresh(world["pvc"])
    pvc["metadata"]["ownerReferences"][0]["uid"] = run["metadata"]["uid"]
    core.create_namespaced_persistent_volume_claim(NAMESPACE, pvc)
    job_uids = {}
    for old in world["jobs"]:
        job = _fresh(old)
        job["metadata"]["ownerReferences"][0]["uid"] = run["metadata"]["uid"]
        job["spec"].pop("selector", None)
        labels = job["spec"]["template"]["metadata"]["labels"]
        for label in JOB_LABELS:
            labels.pop(label, None)
        made = json.loads(batch.create_namespaced_job(NAMESPACE, job, _preload_content=False).data)
        job_uids[old["metadata"]["uid"]] = made["metadata"]["uid"]
        batch.replace_namespaced_job_status(job["metadata"]["name"], NAMESPACE, {**made, "status": old["status"]})
    for old in world["pods"]:
        pod = _fresh(old)
        uid = job_uids[pod["metadata"]["labels"][CONTROLLER_UID_LABEL]]
        pod["metadata"]["labels"][CONTROLLER_UID_LABEL] = uid
        pod["metadata"]["ownerReferences"][0]["uid"] = uid
        core.create_namespaced_pod(NAMESPACE, pod)
        core.patch_namespaced_pod_status(pod["metadata"]["name"], NAMESPACE, {"status": old["status"]})


def peak_rss_mib(pid: int) -> float:
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("VmHWM:"):
            return int(row.split()[1]) / 1024
    return 0.0


def metric(text: str, prefix: str) -> float:
    return sum(float(r.rsplit(" ", 1)[1]) for r in text.splitlines() if r.startswith(prefix))


def start_operator(
    plane: controlplane.ControlPlane,
    operator_path: str,
    log: Path,
    port: int,
    settle: float,
    extra_env: dict[str, str],
) -> dict[str, Any]:
    env = {**python_env(), **extra_env}
    env["PYTHONPATH"] = os.pathsep.join([operator_path, env.get("PYTHONPATH", "")])
    argv = [sys.executable, "-m", "rlhf_operator", "run", "--namespace", NAMESPACE, "--no-leader-election",
            "--kubeconfig", str(plane.kubeconfig(plane.operator)), "--health-host", "127.0.0.1",
            "--health-port", str(port)]  # fmt: skip
    began = time.monotonic()
    proc = subprocess.Popen(argv, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)
    try:
        while http_get(port, "/readyz")[0] != 200:
            if proc.poll() is not None or time.monotonic() - began > 300:
                raise RuntimeError(f"the operator did not become ready; see {log}")
            time.sleep(0.2)
        ready = time.monotonic() - began
        time.sleep(settle)  # adoption: the first passes over every run
        before = http_get(port, "/metrics")[1]
        time.sleep(30)  # one resync interval (30 s): the steady state
        after = http_get(port, "/metrics")[1]
        return {
            "peak_rss_mib": round(peak_rss_mib(proc.pid), 1),
            "rss_mib_now": round(int(Path(f"/proc/{proc.pid}/statm").read_text().split()[1]) * 4096 / 2**20, 1),
            "ready_s": round(ready, 1),
            "passes": metric(after, "rlhf_reconcile_total"),
            "passes_in_30s_steady": metric(after, "rlhf_reconcile_total") - metric(before, "rlhf_reconcile_total"),
            "own_requests_total": metric(after, "rlhf_api_requests_total"),  # absent before this change
            "own_requests_in_30s_steady": metric(after, "rlhf_api_requests_total")
            - metric(before, "rlhf_api_requests_total"),
            "own_requests_other_than_log_reads": metric(after, "rlhf_api_requests_total")
            - metric(after, 'rlhf_api_requests_total{request="GET pods/log"}'),
        }
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--running", type=int, default=300, help="runs left with their third stage running")
    parser.add_argument(
        "--operator-path",
        action="append",
        default=None,
        help="operator source dirs to compare, each as DIR or KEY=VALUE,...@DIR (environment for that operator)",
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rlhf-memory-probe"))
    parser.add_argument("--settle", type=float, default=60.0, help="seconds after /readyz before measuring")
    args = parser.parse_args()
    plane = controlplane.start(args.workdir)
    try:
        plane.kubectl("apply", "--server-side", "-f", str(REPO / "crds" / "rlhfruns.rlhf-operator.io.yaml"))
        for _ in range(60):  # `kubectl wait` errors out until the new CRD has conditions at all
            wait = ["wait", "--for=condition=Established", "--timeout=60s", "crd/rlhfruns.rlhf-operator.io"]
            if plane.kubectl(*wait, check=False).startswith("customresourcedefinition"):
                break
            time.sleep(0.5)
        plane.kubectl("apply", "-f", str(REPO / "deploy" / "rbac.yaml"))
        plane.kubectl("create", "namespace", NAMESPACE)
        time.sleep(5)  # the CRD's OpenAPI schema reaches the API server's validation
        api = config.new_client_from_config(config_file=str(plane.kubeconfig()))
        api.configuration.connection_pool_maxsize = 16
        began = time.monotonic()
        build_run(api, 0, running=True)
        build_run(api, 1, running=False)
        sources = [template(api, "run-00000"), template(api, "run-00001")]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: copy_run(api, sources[i >= args.running], i), range(2, args.runs)))
        print(f"built {args.runs} runs in {time.monotonic() - began:.0f}s", flush=True)
        results: dict[str, Any] = {}
        for spec in args.operator_path or [str(REPO / "operator")]:
            settings, _, path = spec.rpartition("@")
            extra = dict(e.split("=", 1) for e in settings.split(",") if e)
            for attempt in ("start", "restart"):
                key = f"{spec} {attempt}"
                log = args.workdir / f"operator-{len(results)}.log"
                results[key] = start_operator(plane, path, log, controlplane.free_port(), args.settle, extra)
                print(json.dumps({key: results[key]}), flush=True)
    finally:
        plane.stop()


if __name__ == "__main__":
    main()
