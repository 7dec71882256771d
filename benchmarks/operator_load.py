"""Benchmark: the operator under load, on a real control plane with simulated GPU nodes (issue 14).

    PYTHONPATH=operator:stages python benchmarks/operator_load.py --sizes 100,1000 --modes paced,burst
    make bench-operator BENCH_ARGS="--sizes 100"

What runs: etcd + kube-apiserver (rlhf_operator.dev.controlplane) with an audit log of the operator's
own requests (Metadata level: verb, resource, user, time), kube-controller-manager with the real Job
controller, kube-scheduler, KWOK (tests/kwok/build.sh) as the kubelet of one node with GPUs, and the
operator started with the chart's arguments and RBAC (helm template; --scope namespace: the chart with
watchNamespaces, as most installs; --scope cluster: every namespace). N RLHFRuns of the quickstart's shape
(examples/tiny.yaml: PPO, 4 stages, each stage asking for one GPU) go through their stages; KWOK marks a
stage's Pod Running at once and Succeeded after --stage-seconds.

Modes:
  paced  runs are created one by one so that stage transitions arrive at about --rate per second
         (3 transitions per run: sft -> reward -> ppo -> merge).
  burst  all runs at once, and each stage's Pods are held Running until every run has one, then released
         together (a KWOK Stage created at that moment): N simultaneous transitions per wave.
  --handover (burst): the operator is stopped before the first wave is released and started once every
         Job of it is Complete, so N transitions wait for it at once whatever pace the cluster side has
         (on this machine a released wave takes about a minute to complete); the wave's rows are its
         own, and the latency rows leave it out.
  --failing K (paced): K of the runs fail in their first stage (their Pods exit 1 with a failed
         StageResult); once the idle window has ended the benchmark counts which of them got their
         Warning event, the one a user looks for first, while the event queue is full of others.

Measured (every figure from this process's own watch or from the audit log, never from the operator's
word, except "adopted", which is its rlhf_runs gauge):
  transition latency   a stage Job seen Complete -> the run's next stage Job seen created (p50, p99, max)
  wave served          burst: a wave's first Job seen Complete -> the last next-stage Job seen created
  --handover CPU       every process's CPU seconds (/proc, all threads) from the operator's start to the
                       last next-stage Job: who the served wave's time went to
  wave completed over  burst: a wave's first Job seen Complete -> its last one (the Job controller's and the
                       simulated kubelet's part of "served": a transition starts when its Job is Complete)
  requests per run     the operator's API requests while the runs ran, / N (writes and LISTs apart)
  writes per pass      each writing pass's own count (its rlhf_reconcile_writes histogram, by what it
                       created: start, job = a stage transition, none), beside the audit log's total
  idle requests/s      the operator's requests per second over --idle-seconds once every run finished
  peak RSS             the operator's VmHWM on first start (after the runs) and after a restart
  restart              SIGTERM, start again: seconds until its first RLHFRun watch opened (audit log), until
                       /readyz answered 200, and until its rlhf_runs gauge counted all N runs ("never":
                       not within --gauge-timeout; an operator that leaves finished runs alone need not count them);
                       status writes it made in that window (a restart should rewrite nothing)

Not a test: nothing is asserted (tests/kwok/test_operator_load.py runs it at 5 runs and checks the
figures are produced). Numbers are whatever this machine gives: run it on a quiet machine, and say
which (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "stages"), str(REPO)]

from kubernetes import client, config, watch  # noqa: E402
from tests.chart.tools import Helm, wait_established  # noqa: E402
from tests.pythonpath import python_env  # noqa: E402

from rlhf_api.names import LABEL_RUN, LABEL_STAGE  # noqa: E402
from rlhf_operator.dev import controlplane  # noqa: E402
from rlhf_operator.dev.controlplane import OPERATOR_USER, ControlPlane, free_port, terminate  # noqa: E402

KWOK_BUILD = REPO / "tests" / "kwok" / "build.sh"
CRD_FILE = REPO / "crds" / "rlhfruns.rlhf-operator.io.yaml"
RUNS_NAMESPACE = "bench"
OPERATOR_NAMESPACE = "rlhf-system"  # with release "rlhf-operator": the identity of plane.operator
NODE = "kwok-gpu-0"
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection"}


def kwok_dir() -> Path:
    """bin/kwok and crd/stages.yaml; builds them on first use (cached outside the clone)."""
    override = os.environ.get("RLHF_KWOK_DIR")
    if override:
        return Path(override)
    out = subprocess.run(["bash", str(KWOK_BUILD)], check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


# --- the simulated node and its Pods (KWOK Stages) -------------------------------------------------


def node_manifest(gpus: int) -> dict[str, Any]:
    capacity = {"cpu": "100k", "memory": "1000Ti", "pods": str(max(110, gpus * 2)), "nvidia.com/gpu": str(gpus)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE, "annotations": {KWOK_ANNOTATION: "fake"}, "labels": {"type": "kwok"}},
        # The status a kubelet registers with; KWOK's node Stage below then marks it Ready.
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def _stage(name: str, kind: str, selector: list[dict[str, Any]], template: str, delay_ms: int = 0) -> dict[str, Any]:
    return {
        "apiVersion": "kwok.x-k8s.io/v1alpha1",
        "kind": "Stage",
        "metadata": {"name": name},
        "spec": {
            "resourceRef": {"apiGroup": "v1", "kind": kind},
            "selector": {"matchExpressions": selector},
            "delay": {"durationMilliseconds": delay_ms},
            "next": {"statusTemplate": template},
        },
    }


def node_ready_stage(kubelet_port: int) -> dict[str, Any]:
    # The kubelet endpoint is a loopback port nothing listens on: the operator's log reads (live progress)
    # fail at once instead of waiting out a connect timeout to an address that does not exist.
    template = f"""
conditions:
- type: Ready
  status: "True"
  reason: KubeletReady
  message: simulated by KWOK
  lastHeartbeatTime: {{{{ Now | Quote }}}}
  lastTransitionTime: {{{{ Now | Quote }}}}
addresses:
- type: InternalIP
  address: 127.0.0.1
daemonEndpoints:
  kubeletEndpoint:
    Port: {kubelet_port}
phase: Running
"""
    ready = [
        {"key": '.status.conditions.[] | select( .type == "Ready" ) | .status', "operator": "NotIn", "values": ["True"]}
    ]
    return _stage("bench-node-ready", "Node", ready, template)


def pod_running_stage() -> dict[str, Any]:
    template = """
phase: Running
hostIP: 127.0.0.1
podIP: 10.244.0.2
startTime: {{ Now | Quote }}
conditions:
{{ range list "PodScheduled" "Initialized" "ContainersReady" "Ready" }}
- type: {{ . }}
  status: "True"
  lastTransitionTime: {{ Now | Quote }}
{{ end }}
containerStatuses:
{{ range .spec.containers }}
- name: {{ .name | Quote }}
  image: {{ .image | Quote }}
  ready: true
  started: true
  restartCount: 0
  state:
    running:
      startedAt: {{ Now | Quote }}
{{ end }}
"""
    fresh = [
        {"key": ".metadata.deletionTimestamp", "operator": "DoesNotExist"},
        {"key": ".status.podIP", "operator": "DoesNotExist"},
    ]
    return _stage("bench-pod-running", "Pod", fresh, template)


def pod_succeeded_stage(
    name: str, stages: list[str], delay_ms: int, failing: Sequence[str] = (), fail: bool = False
) -> dict[str, Any]:
    """Running stage Pods of the given stages exit 0 after ``delay_ms``, with the StageResult a real stage
    writes to its termination log. The Pods of the runs in ``failing`` are left alone; with ``fail``,
    only those, and they exit 1 with a failed StageResult (--failing's runs)."""
    label = f'.metadata.labels["{LABEL_STAGE}"]'
    # Inside `range`, `$` is the Pod; printf's %q quotes a stage name as JSON does.
    outcome = r"\"succeeded\": false, \"message\": \"simulated failure\"" if fail else r"\"succeeded\": true"
    result = f'printf "{{\\"stage\\": %q, {outcome}, \\"step\\": 1}}" (index $.metadata.labels "{LABEL_STAGE}")'
    phase, reason, code = ("Failed", "Error", 1) if fail else ("Succeeded", "Completed", 0)
    template = f"""
phase: {phase}
conditions:
- type: Ready
  status: "False"
  reason: PodCompleted
  lastTransitionTime: {{{{ Now | Quote }}}}
- type: ContainersReady
  status: "False"
  reason: PodCompleted
  lastTransitionTime: {{{{ Now | Quote }}}}
containerStatuses:
{{{{ range .spec.containers }}}}
- name: {{{{ .name | Quote }}}}
  image: {{{{ .image | Quote }}}}
  ready: false
  started: false
  restartCount: 0
  state:
    terminated:
      exitCode: {code}
      reason: {reason}
      message: {{{{ {result} | Quote }}}}
      startedAt: {{{{ Now | Quote }}}}
      finishedAt: {{{{ Now | Quote }}}}
{{{{ end }}}}
"""
    running = [
        {"key": ".metadata.deletionTimestamp", "operator": "DoesNotExist"},
        {"key": ".status.phase", "operator": "In", "values": ["Running"]},
        {"key": label, "operator": "In", "values": stages},
    ]
    if failing:
        run_label = f'.metadata.labels["{LABEL_RUN}"]'
        running.append({"key": run_label, "operator": "In" if fail else "NotIn", "values": list(failing)})
    return _stage(name, "Pod", running, template, delay_ms)


# --- the cluster ------------------------------------------------------------------------------------

AUDIT_POLICY = f"""apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  users: ["{OPERATOR_USER}"]
- level: None
"""


@contextlib.contextmanager
def audited(policy: Path, log: Path) -> Iterator[None]:
    """kube-apiserver started inside the ``with`` also writes an audit log. controlplane.start() takes no
    extra API server flags, so its per-mode argument list is extended for the duration."""
    original = controlplane._apiserver_mode_args

    def with_audit(node: controlplane.NodeOptions | None) -> list[str]:
        return [
            *original(node),
            f"--audit-policy-file={policy}",
            f"--audit-log-path={log}",
            "--audit-log-format=json",
            "--audit-log-maxsize=0",  # one file: the benchmark reads it whole
        ]

    controlplane._apiserver_mode_args = with_audit
    try:
        yield
    finally:
        controlplane._apiserver_mode_args = original


@dataclass
class Cluster:
    plane: ControlPlane
    workdir: Path
    audit_log: Path
    kwok: Path
    api: client.ApiClient
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    kwok_argv: list[str] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with (self.workdir / f"{name}.log").open("ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.processes.append(proc)
        return proc

    def restart_kwok(self) -> None:
        """KWOK plays a Stage on an object when the object changes, and reads every object when it starts:
        a restart is how a Stage created later reaches Pods that already run, all at one moment."""
        old = next(p for p in self.processes if p.args == self.kwok_argv and p.poll() is None)
        terminate([old], grace=10)
        self.processes.remove(old)
        self.spawn("kwok", self.kwok_argv)

    def apply(self, docs: list[dict[str, Any]], server_side: bool = False) -> None:
        text = yaml.safe_dump_all(docs)
        self.plane.kubectl("apply", *(["--server-side"] if server_side else []), "-f", "-", input=text)

    def stop(self) -> None:
        terminate(self.processes, grace=10)
        # A throwaway plane: SIGKILL, its data goes with the workdir.
        for proc in self.plane.processes:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.plane.stop()


def start_cluster(workdir: Path, gpus: int) -> Cluster:
    policy, audit_log = workdir / "audit-policy.yaml", workdir / "audit.log"
    policy.write_text(AUDIT_POLICY)
    with audited(policy, audit_log):
        plane = controlplane.start(workdir / "plane")
    kwok = kwok_dir()
    cluster = Cluster(plane, workdir, audit_log, kwok, config.new_client_from_config(str(plane.kubeconfig())))
    try:
        _start_components(cluster, gpus)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _start_components(cluster: Cluster, gpus: int) -> None:
    plane, admin = cluster.plane, str(cluster.plane.kubeconfig())
    plane.kubectl("apply", "--server-side", "-f", str(CRD_FILE), "-f", str(cluster.kwok / "crd" / "stages.yaml"))
    wait_established(plane)
    wait_established(plane, "stages.kwok.x-k8s.io")
    # Established is not served from the watch cache yet: a LIST at resourceVersion=0 (what kopf and
    # KWOK send first) answers 429 "storage is (re)initializing" for a moment, and kopf then backs off for
    # up to 30 s, which the first transitions' latency would carry.
    for path in ("/apis/rlhf-operator.io/v1alpha1/rlhfruns", "/apis/kwok.x-k8s.io/v1alpha1/stages"):
        wait_until(
            f"{path} served from the watch cache",
            lambda p=path: "List" in plane.kubectl("get", "--raw", f"{p}?resourceVersion=0&limit=1", check=False),
            60,
            0.2,
        )
    # The Job controller (the plane's own controller-manager runs the garbage collector only). Client
    # limits raised as KWOK's own benchmarks do: the harness must not be what throttles a burst.
    unthrottled = ["--kube-api-qps=1000", "--kube-api-burst=2000", "--leader-elect=false", "--secure-port=0"]
    cluster.spawn(
        "kube-controller-manager-job",
        [str(plane.bin_dir / "kube-controller-manager"), "--kubeconfig", admin, "--controllers=job", *unthrottled],
    )
    # The scheduler, without its volume plugins: the workspace PVCs stay unbound (no provisioner), and a
    # simulated node mounts nothing.
    scheduler_config = cluster.workdir / "scheduler.yaml"
    off = [{"name": n} for n in ("VolumeBinding", "VolumeRestrictions", "VolumeZone", "NodeVolumeLimits")]
    scheduler_config.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kubescheduler.config.k8s.io/v1",
                "kind": "KubeSchedulerConfiguration",
                "clientConnection": {"kubeconfig": admin, "qps": 1000, "burst": 2000},
                "leaderElection": {"leaderElect": False},
                "profiles": [{"schedulerName": "default-scheduler", "plugins": {"multiPoint": {"disabled": off}}}],
            }
        )
    )
    cluster.spawn(
        "kube-scheduler", [str(plane.bin_dir / "kube-scheduler"), "--config", str(scheduler_config), "--secure-port=0"]
    )
    kwok_config = cluster.workdir / "kwok.yaml"
    kwok_config.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
                "kind": "KwokConfiguration",
                "options": {
                    "enableCRDs": ["Stage"],
                    "manageNodesWithAnnotationSelector": f"{KWOK_ANNOTATION}=fake",
                    # A configuration file gets no defaults: KWOK refuses a parallelism of 0.
                    "podPlayStageParallelism": 16,
                    "nodePlayStageParallelism": 4,
                    "podsOnNodeSyncParallelism": 4,
                    "nodeLeaseParallelism": 1,
                },
            }
        )
    )
    cluster.kwok_argv = [str(cluster.kwok / "bin" / "kwok"), "--kubeconfig", admin, "--config", str(kwok_config)]
    cluster.spawn("kwok", cluster.kwok_argv)
    cluster.apply([node_ready_stage(free_port()), pod_running_stage()])
    cluster.apply([node_manifest(gpus)])
    core = client.CoreV1Api(cluster.api)
    wait_until("the KWOK node is Ready", lambda: _node_ready(core), 60)
    # The API server taints a new Node not-ready; node-lifecycle (not running here) would lift it.
    plane.kubectl("taint", "nodes", NODE, "node.kubernetes.io/not-ready:NoSchedule-")


def _node_ready(core: client.CoreV1Api) -> bool:
    node = core.read_node(NODE)
    return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])


def wait_until(what: str, check: Any, timeout: float, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


# --- the operator, as the chart starts it -----------------------------------------------------------


@dataclass
class Operator:
    argv: list[str]
    env: dict[str, str]
    port: int
    proc: subprocess.Popen[bytes] | None = None

    def start(self, cluster: Cluster, name: str) -> None:
        self.proc = cluster.spawn(name, self.argv, self.env)

    def peak_rss_mib(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM")

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""
        except OSError:
            return 0, ""

    def cpu_seconds(self) -> float:
        """User + system CPU time the operator process has used so far."""
        assert self.proc is not None
        return proc_stat_cpu(Path(f"/proc/{self.proc.pid}/stat").read_text())[1]

    def scrape(self) -> tuple[dict[str, list[float]], dict[str, float], dict[str, list[float]]]:
        """From one read of /metrics: its wait histograms (name -> [count, mean seconds, share over 1 s])
        and the Events it dropped (``rlhf_events_dropped_total`` -> [count]); its COUNTERS (``name{labels}``
        -> value); its own count of each pass's writes (parse_pass_writes)."""
        status, text = self.http("/metrics")
        if status != 200:
            return {}, {}, {}
        dropped = [
            float(line.split()[-1]) for line in text.splitlines() if line.startswith("rlhf_events_dropped_total ")
        ]
        waits = {**parse_histograms(text), **({"rlhf_events_dropped_total": dropped} if dropped else {})}
        return waits, parse_counters(text), parse_pass_writes(text)

    def runs_known(self) -> int:
        """The runs the operator reports (its rlhf_runs gauge, every phase)."""
        status, text = self.http("/metrics")
        if status != 200:
            return 0
        return int(sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("rlhf_runs{")))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def install_operator(cluster: Cluster, scope: str, overrides: Sequence[str] = ()) -> Operator:
    """The chart's RBAC and the operator's command line and environment from its Deployment
    (``overrides``: chart values as ``operator.workers=16``, for experiments)."""
    values: dict[str, Any] = {"watchNamespaces": [RUNS_NAMESPACE] if scope == "namespace" else []}
    for override in overrides:
        path, _, text = override.partition("=")
        *parents, leaf = path.split(".")
        node = values
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = yaml.safe_load(text)
    (cluster.workdir / "helm").mkdir(exist_ok=True)
    docs = Helm(cluster.workdir / "helm").template(values, "rlhf-operator", OPERATOR_NAMESPACE)
    rbac_kinds = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    cluster.apply([d for d in docs if d["kind"] in rbac_kinds])
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    port = free_port()
    # The image's ENTRYPOINT (python -m rlhf_operator) and the chart's args; outside a Pod only the way to
    # the API server (a kubeconfig for the operator's identity instead of in-cluster config) and the
    # probe address differ.
    args = [a for a in container["args"] if not a.startswith("--health-port")]
    argv = [sys.executable, "-m", "rlhf_operator", *args, f"--health-port={port}", "--health-host=127.0.0.1"]
    argv += ["--kubeconfig", str(cluster.plane.kubeconfig(cluster.plane.operator))]
    env = python_env(POD_NAME="rlhf-operator-7d9f8-abcde", POD_NAMESPACE=OPERATOR_NAMESPACE)
    env.update({e["name"]: e["value"] for e in container["env"] if "value" in e})
    return Operator(argv, env, port)


# --- the runs and what the benchmark sees of them ---------------------------------------------------


def run_manifest(name: str) -> dict[str, Any]:
    """examples/tiny.yaml's run (PPO: sft, reward, ppo, merge), renamed, each stage on one GPU."""
    manifest = copy.deepcopy(yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text()))
    manifest["metadata"] = {"name": name, "namespace": RUNS_NAMESPACE}
    for stage in ("sft", "reward", "ppo", "merge"):
        manifest["spec"][stage]["resources"]["gpus"] = 1
    return manifest


class Tracker:
    """This process's own watch of the stage Jobs and Pods: when each Job was first seen created and
    first seen Complete, and which Pods are Running (the burst mode's release condition)."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.lock = threading.Lock()
        self.job_added: dict[str, float] = {}
        self.job_complete: dict[str, float] = {}
        self.job_run: dict[str, tuple[str, str]] = {}  # job -> (run, stage)
        self.pods_running: dict[str, set[str]] = {}  # stage -> pod names
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(target=self._loop, args=(self._jobs,), daemon=True),
            threading.Thread(target=self._loop, args=(self._pods,), daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def _loop(self, body: Any) -> None:
        while not self.stopping.is_set():
            with contextlib.suppress(Exception):  # a watch that expired or broke: list and watch again
                body()

    # Plain JSON (deserialize=False): the client's model classes cost milliseconds per object, which at
    # thousands of events would make this watch lag behind what it times. A stream the server ends is
    # listed and watched again by _loop; setdefault keeps the first sighting.
    def _jobs(self) -> None:
        batch = client.BatchV1Api(self.api)
        for event in watch.Watch().stream(batch.list_namespaced_job, RUNS_NAMESPACE, deserialize=False):
            now, job = time.time(), event["object"]
            name, labels = job["metadata"]["name"], job["metadata"].get("labels") or {}
            with self.lock:
                self.job_added.setdefault(name, now)
                self.job_run[name] = (labels.get(LABEL_RUN, ""), labels.get(LABEL_STAGE, ""))
                conditions = (job.get("status") or {}).get("conditions") or []
                if any(c["type"] == "Complete" and c["status"] == "True" for c in conditions):
                    self.job_complete.setdefault(name, now)
            if self.stopping.is_set():
                return

    def _pods(self) -> None:
        core = client.CoreV1Api(self.api)
        for event in watch.Watch().stream(core.list_namespaced_pod, RUNS_NAMESPACE, deserialize=False):
            pod = event["object"]
            name, stage = pod["metadata"]["name"], (pod["metadata"].get("labels") or {}).get(LABEL_STAGE, "")
            phase = (pod.get("status") or {}).get("phase")
            with self.lock:
                running = self.pods_running.setdefault(stage, set())
                if event["type"] != "DELETED" and phase == "Running":
                    running.add(name)
                else:
                    running.discard(name)
            if self.stopping.is_set():
                return

    def running(self, stage: str) -> int:
        with self.lock:
            return len(self.pods_running.get(stage, ()))

    def transitions(self) -> list[tuple[str, str, float, float]]:
        """(run, next stage, previous Job seen Complete, next Job seen created) for every transition."""
        with self.lock:
            by_run: dict[str, list[str]] = {}
            for job, (run, _) in self.job_run.items():
                by_run.setdefault(run, []).append(job)
            out = []
            for run, jobs in by_run.items():
                jobs.sort(key=lambda j: self.job_added[j])
                for previous, following in itertools.pairwise(jobs):
                    if previous in self.job_complete:
                        out.append(
                            (run, self.job_run[following][1], self.job_complete[previous], self.job_added[following])
                        )
            return out

    def transition_jobs(self) -> list[tuple[str, float, float]]:
        """(next Job's name, previous Job seen Complete, next Job seen created) for every transition."""
        with self.lock:
            by_run: dict[str, list[str]] = {}
            for job, (run, _) in self.job_run.items():
                by_run.setdefault(run, []).append(job)
            out = []
            for jobs in by_run.values():
                jobs.sort(key=lambda j: self.job_added[j])
                for previous, following in itertools.pairwise(jobs):
                    if previous in self.job_complete:
                        out.append((following, self.job_complete[previous], self.job_added[following]))
            return out

    def stop(self) -> None:
        self.stopping.set()


def runs_in(api: client.ApiClient, *phases: str) -> int:
    custom = client.CustomObjectsApi(api)
    runs = custom.list_namespaced_custom_object("rlhf-operator.io", "v1alpha1", RUNS_NAMESPACE, "rlhfruns")
    return sum(1 for r in runs["items"] if (r.get("status") or {}).get("phase") in phases)


def failing_runs(names: list[str], count: int) -> list[str]:
    """``count`` of the runs, spread evenly over the creation order (--failing)."""
    return names[:: max(1, len(names) // count)][:count] if count else []


def warnings_by_run(api: client.ApiClient) -> tuple[dict[str, set[str]], int]:
    """The Warning events on RLHFRuns in the runs' namespace: run -> reasons, and how many such events."""
    events = client.CoreV1Api(api).list_namespaced_event(RUNS_NAMESPACE, field_selector="type=Warning").items
    by_run: dict[str, set[str]] = {}
    for event in events:
        if event.involved_object.kind == "RLHFRun":
            by_run.setdefault(event.involved_object.name, set()).add(event.reason)
    return by_run, len(events)


def create_runs(cluster: Cluster, names: list[str], interval: float) -> None:
    """All at once (one kubectl create), or one every ``interval`` seconds."""
    if interval <= 0:
        docs = [run_manifest(n) for n in names]
        for start in range(0, len(docs), 500):  # kubectl reads a multi-document file in one go
            cluster.plane.kubectl("create", "-f", "-", input=yaml.safe_dump_all(docs[start : start + 500]))
        return
    custom = client.CustomObjectsApi(cluster.api)
    begin = time.monotonic()
    for i, name in enumerate(names):
        delay = begin + i * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        custom.create_namespaced_custom_object(
            "rlhf-operator.io", "v1alpha1", RUNS_NAMESPACE, "rlhfruns", run_manifest(name)
        )


def create_unrelated(cluster: Cluster, count: int) -> None:
    """``count`` objects the operator must not care about, half Pods and half Jobs, in 10 other namespaces:
    Pods bound to a node no kubelet serves (they stay Pending), Jobs suspended (no Pods)."""
    namespaces = [f"other-{i}" for i in range(10)]
    cluster.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in namespaces])
    container = {"name": "main", "image": "registry.example/app:1", "resources": {"requests": {"cpu": "10m"}}}
    docs: list[dict[str, Any]] = []
    for i in range(count):
        meta = {"name": f"unrelated-{i}", "namespace": namespaces[i % 10], "labels": {"app": "unrelated"}}
        if i % 2:
            spec = {"nodeName": "elsewhere", "containers": [container]}
            docs.append({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec})
        else:
            template = {"spec": {"restartPolicy": "Never", "containers": [container]}}
            docs.append(
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "metadata": meta,
                    "spec": {"suspend": True, "template": template},
                }
            )
    for start in range(0, len(docs), 1000):
        cluster.plane.kubectl("create", "-f", "-", input=yaml.safe_dump_all(docs[start : start + 1000]))


HISTOGRAMS = (
    "rlhf_workqueue_wait_seconds",
    "rlhf_api_rate_limit_wait_seconds",
    "rlhf_reconcile_duration_seconds",
    "rlhf_event_loop_lag_seconds",
)


# Why passes happen, or not (issue 14: most passes under load wrote nothing).
COUNTERS = ("rlhf_reconcile_total", "rlhf_watch_events_ignored_total", "rlhf_workqueue_delayed_passes_cancelled_total")


def parse_counters(text: str) -> dict[str, float]:
    """``name{labels}`` -> value of the COUNTERS, from a Prometheus exposition."""
    out = {}
    for line in text.splitlines():
        metric, _, value = line.rpartition(" ")
        name = metric.split("{", 1)[0]
        if name in COUNTERS:
            out[metric] = float(value)
    return out


def parse_histograms(text: str) -> dict[str, list[float]]:
    """``name{labels}`` -> [observations, mean seconds, share of them over 1 s], from a Prometheus
    exposition, for the HISTOGRAMS (one entry per label set)."""
    parts: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        metric, _, value = line.rpartition(" ")
        for name in HISTOGRAMS:
            for part in ("count", "sum", "bucket"):
                prefix = f"{name}_{part}"
                if not metric.startswith(prefix) or metric[len(prefix) : len(prefix) + 1] not in ("", "{"):
                    continue
                labels, field_name = metric[len(prefix) :].strip("{}"), part
                if part == "bucket":
                    le = next((x for x in labels.split(",") if x.startswith("le=")), "")
                    if le != 'le="1.0"':
                        continue
                    labels, field_name = ",".join(x for x in labels.split(",") if not x.startswith("le=")), "le1"
                parts.setdefault(f"{name}{{{labels}}}" if labels else name, {})[field_name] = float(value)
    return {
        key: [v["count"], round(v["sum"] / v["count"], 4), round(1 - v.get("le1", v["count"]) / v["count"], 4)]
        for key, v in parts.items()
        if v.get("count")
    }


def parse_pass_writes(text: str) -> dict[str, list[float]]:
    """rlhf_reconcile_writes by ``created`` label -> [writing passes, mean writes, share over 3, most
    writes]: the operator's own count of each pass's writes (its buckets are whole numbers up to 6, so
    the most is exact up to 6; above, the bucket's bound)."""
    buckets: dict[str, list[tuple[float, float]]] = {}
    sums: dict[str, float] = {}
    for line in text.splitlines():
        metric, _, value = line.rpartition(" ")
        if metric.startswith("rlhf_reconcile_writes_bucket{"):
            labels = dict(kv.split("=", 1) for kv in metric[len("rlhf_reconcile_writes_bucket{") : -1].split(","))
            created, le = labels["created"].strip('"'), labels["le"].strip('"')
            buckets.setdefault(created, []).append((float(le), float(value)))
        elif metric.startswith("rlhf_reconcile_writes_sum{"):
            sums[metric.split('"')[1]] = float(value)
    out = {}
    for created, cumulative in buckets.items():
        cumulative.sort()
        passes = cumulative[-1][1]
        if not passes:
            continue
        over_three = passes - next(count for bound, count in cumulative if bound >= 3)
        most = next(bound for bound, count in cumulative if count == passes)
        out[created] = [passes, round(sums.get(created, 0.0) / passes, 2), round(over_three / passes, 4), most]
    return out


def merge_pass_writes(*counts: dict[str, list[float]]) -> dict[str, list[float]]:
    """parse_pass_writes's summaries of several operator processes (before and after a --handover) as one."""
    out: dict[str, list[float]] = {}
    for count in counts:
        for created, (passes, mean, over, most) in count.items():
            if created not in out:
                out[created] = [passes, mean, over, most]
                continue
            before = out[created]
            total = before[0] + passes
            out[created] = [
                total,
                round((before[0] * before[1] + passes * mean) / total, 2),
                round((before[0] * before[2] + passes * over) / total, 4),
                max(before[3], most),
            ]
    return out


def proc_stat_cpu(text: str) -> tuple[str, float]:
    """(comm, user + system CPU seconds of every thread) from a /proc/<pid>/stat text. The comm is
    cut at the last ")": it may itself hold spaces and parentheses."""
    comm, rest = text[text.index("(") + 1 :].rsplit(")", 1)
    fields = rest.split()
    return comm, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_process(named: dict[int, str]) -> dict[str, float]:
    """CPU seconds each process on the machine has used so far, summed by its name (``named``'s for
    the pids it names, else the kernel's comm): who a window's CPU went to."""
    out: Counter[str] = Counter()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            comm, cpu = proc_stat_cpu(stat.read_text())
        except OSError:  # exited meanwhile
            continue
        out[named.get(int(stat.parent.name), comm)] += cpu
    return dict(out)


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all cores so far, from /proc/stat."""
    cpu = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = cpu[3] + cpu[4]  # idle + iowait
    return sum(cpu) - idle, sum(cpu)


# --- the audit log ----------------------------------------------------------------------------------


@dataclass
class Request:
    at: float
    verb: str
    resource: str  # "jobs", "rlhfruns/status", ...
    name: str = ""
    received: float = 0.0  # when the API server received it (``at``: when it answered)


def operator_requests(audit_log: Path) -> list[Request]:
    """Every request of the operator's identity: non-watch ones when answered, watches when opened."""
    out = []
    with audit_log.open() as lines:
        for line in lines:
            event = json.loads(line)
            if event.get("user", {}).get("username") != OPERATOR_USER:
                continue
            watching = event["verb"] == "watch"
            if event["stage"] != ("ResponseStarted" if watching else "ResponseComplete"):
                continue
            ref = event.get("objectRef") or {}
            resource = ref.get("resource", "") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
            stamp, received = (
                datetime.datetime.fromisoformat(event[k].replace("Z", "+00:00")).timestamp()
                for k in ("stageTimestamp", "requestReceivedTimestamp")
            )
            out.append(Request(stamp, event["verb"], resource, ref.get("name", ""), received))
    return out


def between(requests: list[Request], start: float, end: float) -> list[Request]:
    return [r for r in requests if start <= r.at < end]


def decided_at(operator_log: Path) -> dict[str, float]:
    """Job name -> when the operator's pass decided to create it (its ``CreateJob <name>`` log line);
    empty for a log that is not there (no --handover)."""
    out: dict[str, float] = {}
    if not operator_log.exists():
        return out
    for line in operator_log.read_text(errors="replace").splitlines():
        head, sep, job = line.partition(": CreateJob ")
        if sep:
            stamp = datetime.datetime.strptime(head[:23], "%Y-%m-%d %H:%M:%S,%f")  # local time, as logged
            out.setdefault(job.strip(), stamp.timestamp())
    return out


SEGMENTS = (
    ("operator: Complete seen -> pass decides", "seen_complete", "decided"),
    ("client: decided -> API server received (rate limit)", "decided", "received"),
    ("API server: received -> answered", "received", "answered"),
    ("watch: answered -> Job seen created", "answered", "seen_created"),
)


def latency_breakdown(
    transitions: list[tuple[str, float, float]], decided: dict[str, float], requests: list[Request]
) -> dict[str, list[float]]:
    """For each segment of a transition (SEGMENTS): [p50, p99, mean over the slowest 1 % of transitions].

    ``transitions``: (next Job's name, previous Job seen Complete, next Job seen created). Transitions
    whose Job has no log line or no audit entry (none, unless a log was cut) are left out."""
    creates = {r.name: r for r in requests if r.verb == "create" and r.resource == "jobs"}
    rows = []
    for job, complete, created in transitions:
        if job in decided and job in creates:
            points = {
                "seen_complete": complete,
                "decided": decided[job],
                "received": creates[job].received,
                "answered": creates[job].at,
                "seen_created": created,
            }
            rows.append((created - complete, points))
    if not rows:
        return {}
    rows.sort(key=lambda row: row[0])
    slowest = rows[-max(1, len(rows) // 100) :]
    out: dict[str, list[float]] = {}
    for label, start, end in (("total", "seen_complete", "seen_created"), *SEGMENTS):
        values = [p[end] - p[start] for _, p in rows]
        tail = [p[end] - p[start] for _, p in slowest]
        out[label] = [
            round(percentile(values, 0.5), 3),
            round(percentile(values, 0.99), 3),
            round(sum(tail) / len(tail), 3),
        ]
    return out


# --- one case ---------------------------------------------------------------------------------------


@dataclass
class Result:
    size: int
    mode: str
    scope: str
    unrelated: int
    transitions: int = 0
    latency_p50_s: float = 0.0
    latency_p99_s: float = 0.0
    latency_max_s: float = 0.0
    wave_served_s: list[float] = field(default_factory=list)
    wave_completed_s: list[float] = field(default_factory=list)
    all_runs_s: float = 0.0
    requests_per_run: float = 0.0
    writes_per_stage: float = 0.0
    lists_per_stage: float = 0.0
    events_per_stage: float = 0.0
    requests_by_kind: dict[str, int] = field(default_factory=dict)  # "verb resource" while the runs ran
    idle_requests_per_s: float = 0.0
    # Where a transition's time went (paced and burst): per segment, p50 / p99 / mean over the slowest 1 %.
    latency_breakdown: dict[str, list[float]] = field(default_factory=dict)
    operator_waits: dict[str, list[float]] = field(default_factory=dict)  # histogram: count, mean, share > 1 s
    operator_counters: dict[str, float] = field(default_factory=dict)  # COUNTERS, at the end of the runs
    # rlhf_reconcile_writes by what the pass created: [writing passes, mean writes, share over 3, most]
    pass_writes: dict[str, list[float]] = field(default_factory=dict)
    writes_while_running: int = 0  # the audit log's count, beside the passes' own (Events queued later count there)
    idle_other_requests_per_s: float = 0.0  # the same without Events (queued while the runs ran, posted late)
    events_after_runs: int = 0  # Events the operator posted once every run had finished (queued late)
    operator_cpu_share: float = 0.0  # of one core, while the runs ran
    machine_cpu_busy: float = 0.0  # of all cores, while the runs ran
    first_start_ready_s: float | None = None
    peak_rss_first_mib: float = 0.0
    peak_rss_restart_mib: float = 0.0
    restart_watch_open_s: float | None = None
    restart_ready_s: float | None = None
    restart_adopted_s: float | None = None
    restart_status_writes: int = 0
    # --handover: the first wave's transitions, all waiting when the operator starts: from its start
    handover_ready_s: float | None = None  # to /readyz
    handover_first_s: float | None = None  # to the first next-stage Job seen created
    handover_served_s: float | None = None  # to the last one
    handover_cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds by process while it served
    failing_runs: int = 0  # --failing: runs whose first stage's Pods exit 1
    failed_runs: int = 0  # runs in phase Failed once every run finished
    failing_runs_warned: int = 0  # of the failing runs, those with a Warning event once the idle window ended
    warning_reasons: dict[str, int] = field(default_factory=dict)  # of those Warnings, by reason
    warning_events: int = 0  # every Warning event in the runs' namespace then


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_case(args: argparse.Namespace, size: int, mode: str, workdir: Path) -> Result:
    result = Result(size, mode, args.scope, args.unrelated)
    cluster = start_cluster(workdir, gpus=max(8, size * 2))
    operator: Operator | None = None
    tracker: Tracker | None = None
    try:
        cluster.apply(
            [
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}}
                for n in (RUNS_NAMESPACE, OPERATOR_NAMESPACE)
            ]
        )
        if args.unrelated:
            log(f"creating {args.unrelated} unrelated Pods and Jobs")
            create_unrelated(cluster, args.unrelated)
        operator = install_operator(cluster, args.scope, args.set)
        log("cluster up; starting the operator")
        tracker = Tracker(cluster.api)
        started = time.time()
        operator.start(cluster, "operator")
        with contextlib.suppress(TimeoutError):
            wait_until("the operator's /readyz", lambda: operator.http("/readyz")[0] == 200, 120, 0.2)
            result.first_start_ready_s = round(time.time() - started, 1)
        log(f"operator ready after {result.first_start_ready_s} s; creating {size} runs")
        names = [f"run-{i:05d}" for i in range(size)]
        stage_ms = int(args.stage_seconds * 1000)
        stages = ["sft", "reward", "ppo", "merge"]
        t0 = time.time()
        cpu0, busy0 = operator.cpu_seconds(), machine_busy()
        failing = failing_runs(names, args.failing)
        carried_writes: dict[str, list[float]] = {}  # --handover: the first process's count, before it stopped
        if mode == "paced":
            cluster.apply(
                [
                    pod_succeeded_stage("bench-pod-succeeded", stages, stage_ms, failing),
                    *(
                        [pod_succeeded_stage("bench-pod-failed", stages[:1], stage_ms, failing, fail=True)]
                        * bool(failing)
                    ),
                ]
            )
            create_runs(cluster, names, interval=3.0 / args.rate)
        else:
            create_runs(cluster, names, interval=0)
            for stage in stages:  # hold each wave until every run's Pod runs, then release it at once
                wait_until(
                    f"{size} running {stage} Pods", lambda s=stage: tracker.running(s) >= size, args.timeout, 0.2
                )
                handover = args.handover and stage == stages[0]
                if handover:  # the operator stops before the wave is released, and starts once it is Complete
                    carried = operator.cpu_seconds() - cpu0
                    carried_writes = operator.scrape()[2]
                    operator.stop()
                cluster.apply([pod_succeeded_stage(f"bench-release-{stage}", [stage], 0)])
                cluster.restart_kwok()
                if handover:
                    _serve_handover(args, cluster, operator, tracker, result, size, stage, stages[1])
                    cpu0 = -carried  # the new process's CPU counts from 0
                    continue
                if stage != stages[-1]:
                    following = stages[stages.index(stage) + 1]
                    wait_until(
                        f"{size} {following} Jobs", lambda f=following: _jobs_of(tracker, f) >= size, args.timeout, 0.2
                    )
                    result.wave_served_s.append(round(_wave_served(tracker, stage, following), 2))
                    result.wave_completed_s.append(round(_wave_completed(tracker, stage), 2))
        wait_until(
            f"{size} runs finished", lambda: runs_in(cluster.api, "Succeeded", "Failed") >= size, args.timeout, 1.0
        )
        result.failed_runs = runs_in(cluster.api, "Failed")
        done = time.time()
        result.all_runs_s = round(done - t0, 1)
        result.operator_cpu_share = round((operator.cpu_seconds() - cpu0) / (done - t0), 2)
        busy1 = machine_busy()
        result.machine_cpu_busy = round((busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]), 2)
        result.operator_waits, result.operator_counters, pass_writes = operator.scrape()
        result.pass_writes = merge_pass_writes(carried_writes, pass_writes)
        log(f"{size} runs ({mode}) finished in {result.all_runs_s} s; idle for {args.idle_seconds} s")
        time.sleep(args.idle_seconds)
        result.peak_rss_first_mib = round(operator.peak_rss_mib(), 1)
        warned, result.warning_events = warnings_by_run(cluster.api)
        result.failing_runs = len(failing)
        result.failing_runs_warned = sum(1 for name in failing if name in warned)
        result.warning_reasons = dict(Counter(r for name in failing for r in warned.get(name, ())))

        # A handed-over wave's transitions waited for the operator's start: its own rows tell them.
        handed_over = stages[1] if args.handover and mode == "burst" else None
        latencies = [
            created - completed
            for _, following, completed, created in tracker.transitions()
            if following != handed_over
        ]
        result.transitions = len(latencies)
        if latencies:
            result.latency_p50_s = round(percentile(latencies, 0.5), 2)
            result.latency_p99_s = round(percentile(latencies, 0.99), 2)
            result.latency_max_s = round(max(latencies), 2)
        requests = operator_requests(cluster.audit_log)
        result.latency_breakdown = latency_breakdown(
            [t for t in tracker.transition_jobs() if tracker.job_run[t[0]][1] != handed_over],
            {**decided_at(cluster.workdir / "operator.log"), **decided_at(cluster.workdir / "operator-handover.log")},
            requests,
        )
        active = between(requests, t0, done)
        verbs = Counter(r.verb for r in active)
        result.requests_by_kind = dict(Counter(f"{r.verb} {r.resource}" for r in active).most_common())
        result.events_per_stage = round(
            sum(1 for r in active if r.verb == "create" and r.resource == "events") / (4 * size), 2
        )
        result.requests_per_run = round(len(active) / size, 1)
        result.writes_while_running = sum(verbs[v] for v in WRITE_VERBS)
        result.writes_per_stage = round(result.writes_while_running / (4 * size), 2)
        result.lists_per_stage = round(verbs["list"] / (4 * size), 2)
        result.events_after_runs = sum(1 for r in requests if r.at >= done and r.resource == "events")
        idle = between(requests, done, done + args.idle_seconds)
        result.idle_other_requests_per_s = round(sum(1 for r in idle if r.resource != "events") / args.idle_seconds, 2)
        result.idle_requests_per_s = round(
            len(between(requests, done, done + args.idle_seconds)) / args.idle_seconds, 2
        )

        # Restart: a graceful stop (it hands its Lease over), then a new process on the same cluster.
        log("restarting the operator")
        operator.stop()
        restarted = time.time()
        operator.start(cluster, "operator-restarted")
        ready = wait_until(
            "the restarted operator's /readyz", lambda: operator.http("/readyz")[0] == 200, args.timeout, 0.2
        )
        result.restart_ready_s = round(time.time() - restarted, 1) if ready else None
        with contextlib.suppress(TimeoutError):
            wait_until(
                "the restarted operator to report every run",
                lambda: operator.runs_known() >= size,
                args.gauge_timeout,
                0.2,
            )
            result.restart_adopted_s = round(time.time() - restarted, 1)
        time.sleep(args.restart_settle)
        result.peak_rss_restart_mib = round(operator.peak_rss_mib(), 1)
        after = between(operator_requests(cluster.audit_log), restarted, time.time())
        watches = [r.at for r in after if r.verb == "watch" and r.resource == "rlhfruns"]
        result.restart_watch_open_s = round(min(watches) - restarted, 1) if watches else None
        log("restart measured; stopping")
        result.restart_status_writes = sum(
            1 for r in after if r.resource == "rlhfruns/status" and r.verb in WRITE_VERBS
        )
        return result
    finally:
        if tracker is not None:
            tracker.stop()
        if operator is not None:
            operator.stop()
        cluster.stop()


def _serve_handover(
    args: argparse.Namespace,
    cluster: Cluster,
    operator: Operator,
    tracker: Tracker,
    result: Result,
    size: int,
    stage: str,
    following: str,
) -> None:
    """--handover: with the operator stopped, wait until every ``stage`` Job is Complete, start it, and
    time how long it takes to create every ``following`` Job: ``size`` transitions waiting at once,
    handed over together whatever pace the cluster side has."""
    wait_until(
        f"{size} {stage} Jobs Complete",
        lambda: len(_seen(tracker, tracker.job_complete, stage)) >= size,
        args.timeout,
        0.2,
    )
    log(f"{size} {stage} Jobs Complete with the operator stopped; starting it")
    before = cpu_by_process({os.getpid(): "benchmark (its watches)"})
    started = time.time()
    operator.start(cluster, "operator-handover")
    with contextlib.suppress(TimeoutError):
        wait_until("the operator's /readyz", lambda: operator.http("/readyz")[0] == 200, 120, 0.2)
        result.handover_ready_s = round(time.time() - started, 2)
    wait_until(f"{size} {following} Jobs", lambda: _jobs_of(tracker, following) >= size, args.timeout, 0.2)
    assert operator.proc is not None
    after = cpu_by_process({os.getpid(): "benchmark (its watches)", operator.proc.pid: "operator"})
    spent = {name: round(cpu - before.get(name, 0.0), 1) for name, cpu in after.items()}
    result.handover_cpu_s = dict(sorted(((n, c) for n, c in spent.items() if c >= 0.5), key=lambda nc: -nc[1]))
    created = _seen(tracker, tracker.job_added, following)
    result.handover_first_s = round(min(created) - started, 2)
    result.handover_served_s = round(max(created) - started, 2)


def _seen(tracker: Tracker, times: dict[str, float], stage: str) -> list[float]:
    """When each of ``stage``'s Jobs was seen (``times``: the tracker's job_added or job_complete)."""
    with tracker.lock:
        return [t for j, t in times.items() if tracker.job_run[j][1] == stage]


def _wave_served(tracker: Tracker, stage: str, following: str) -> float:
    """A burst wave: the first of its Jobs seen Complete -> the last next-stage Job seen created."""
    return max(_seen(tracker, tracker.job_added, following)) - min(_seen(tracker, tracker.job_complete, stage))


def _wave_completed(tracker: Tracker, stage: str) -> float:
    """A burst wave: its first Job seen Complete -> its last one (the Job controller's and the
    simulated kubelet's part: no transition can be served before its Job is seen Complete)."""
    completed = _seen(tracker, tracker.job_complete, stage)
    return max(completed) - min(completed)


def _jobs_of(tracker: Tracker, stage: str) -> int:
    with tracker.lock:
        return sum(1 for _, s in tracker.job_run.values() if s == stage)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the table --------------------------------------------------------------------------------------


def _writes_by_kind(r: Result) -> str:
    """``create events 1.25, update rlhfruns/status 1.3, ...``: where the writes per stage go (issue 14's
    goal is at most 3 per transition)."""
    stages = 4 * r.size
    kinds = [(kind, n) for kind, n in r.requests_by_kind.items() if kind.split(" ", 1)[0] in WRITE_VERBS]
    return ", ".join(f"{kind} {n / stages:.2f}" for kind, n in kinds) or "-"


def _pass_writes(r: Result) -> str:
    """``job: 4000 passes, 2.99 / 0.0% / 3; ...`` and the passes' total beside the audit log's."""
    parts = [
        f"{created}: {passes:.0f} passes, {mean} / {over:.1%} / {most:g}"
        for created, (passes, mean, over, most) in sorted(r.pass_writes.items())
    ]
    total = sum(passes * mean for passes, mean, _, _ in r.pass_writes.values())
    return "; ".join(parts) + f" (passes' total {total:.0f}, audit log {r.writes_while_running})" if parts else "-"


def _passes(r: Result) -> str:
    total = r.operator_counters.get("rlhf_reconcile_total")
    idle = r.operator_waits.get('rlhf_reconcile_duration_seconds{wrote="no"}')
    return f"{total:.0f} / {idle[0]:.0f}" if total is not None and idle else f"{total or '-'} / -"


def _ignored(counters: dict[str, float]) -> str:
    """``pods unchanged 9120, ...``, and the delayed passes (progress polls) dropped."""
    prefix = "rlhf_watch_events_ignored_total{"
    parts = []
    for metric, value in sorted(counters.items()):
        if metric.startswith(prefix):
            labels = dict(kv.split("=", 1) for kv in metric[len(prefix) : -1].split(","))
            parts.append(f"{labels['resource'].strip(chr(34))} {labels['cause'].strip(chr(34))} {value:.0f}")
    cancelled = counters.get("rlhf_workqueue_delayed_passes_cancelled_total")
    if cancelled is not None:
        parts.append(f"delayed passes dropped {cancelled:.0f}")
    return ", ".join(parts) or "-"


ROWS: list[tuple[str, Any]] = [
    ("transitions measured", lambda r: r.transitions),
    ("transition latency p50 / p99 / max", lambda r: f"{r.latency_p50_s} / {r.latency_p99_s} / {r.latency_max_s} s"),
    (
        "burst: wave served (first Complete -> last next Job)",
        lambda r: ", ".join(f"{w} s" for w in r.wave_served_s) or "-",
    ),
    (
        "burst: the wave's Jobs seen Complete over (first -> last)",
        lambda r: ", ".join(f"{w} s" for w in r.wave_completed_s) or "-",
    ),
    (
        "--handover: operator started with every first-stage Job Complete -> /readyz / first / last next Job",
        lambda r: (
            " / ".join(_seconds(v) for v in (r.handover_ready_s, r.handover_first_s, r.handover_served_s))
            if r.handover_served_s is not None
            else "-"
        ),
    ),
    (
        f"--handover: CPU seconds by process from the operator's start to the last next Job ({os.cpu_count()} cores)",
        lambda r: ", ".join(f"{name} {cpu}" for name, cpu in r.handover_cpu_s.items()) or "-",
    ),
    ("all runs done after", lambda r: f"{r.all_runs_s} s"),
    ("API requests per run", lambda r: r.requests_per_run),
    (
        "writes (of them Events) / LISTs per stage",
        lambda r: f"{r.writes_per_stage} ({r.events_per_stage}) / {r.lists_per_stage}",
    ),
    ("writes per stage, by kind", _writes_by_kind),
    ("writes per writing pass, by what it created: mean / over 3 / most", _pass_writes),
    *(
        (f"latency: {label} p50 / p99 / slowest 1 %", lambda r, k=label: _triple(r.latency_breakdown.get(k)))
        for label in ("total", *(segment for segment, _, _ in SEGMENTS))
    ),
    ("operator histograms: count / mean / share over 1 s", lambda r: _waits(r.operator_waits)),
    ("passes: all / wrote nothing", _passes),
    ("watch events passed over (no pass), by resource and cause", lambda r: _ignored(r.operator_counters)),
    (
        "CPU while running: operator (of one core) / machine (of all)",
        lambda r: f"{r.operator_cpu_share} / {r.machine_cpu_busy}",
    ),
    (
        "requests/s once every run finished (without the Events queued while they ran)",
        lambda r: f"{r.idle_requests_per_s} ({r.idle_other_requests_per_s})",
    ),
    (
        "Events posted after every run finished / dropped (queue full)",
        lambda r: f"{r.events_after_runs} / {r.operator_waits.get('rlhf_events_dropped_total', ['-'])[0]}",
    ),
    (
        "peak RSS, first start / after a restart",
        lambda r: f"{r.peak_rss_first_mib:.0f} / {r.peak_rss_restart_mib:.0f} MiB",
    ),
    (
        "--failing: runs made to fail / Failed / with their Warning event (reasons) after the idle window",
        lambda r: (
            f"{r.failing_runs} / {r.failed_runs} / {r.failing_runs_warned} ({_counts(r.warning_reasons)})"
            if r.failing_runs
            else "-"
        ),
    ),
    ("first start: /readyz after", lambda r: _seconds(r.first_start_ready_s)),
    (
        "restart: RLHFRun watch open / /readyz / all runs in its rlhf_runs gauge",
        lambda r: " / ".join(_seconds(v) for v in (r.restart_watch_open_s, r.restart_ready_s, r.restart_adopted_s)),
    ),
    ("restart: status writes", lambda r: r.restart_status_writes),
]


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def _triple(values: list[float] | None) -> str:
    return " / ".join(f"{v} s" for v in values) if values else "-"


def _waits(waits: dict[str, list[float]]) -> str:
    return "; ".join(f"{k}: {v[0]:.0f} / {v[1]} s / {v[2]:.1%}" for k, v in sorted(waits.items()) if len(v) == 3) or "-"


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value} s"


def table(results: list[Result]) -> str:
    head = [f"{r.size:,} runs, {r.mode}" + (f", +{r.unrelated:,} other" if r.unrelated else "") for r in results]
    lines = ["| | " + " | ".join(head) + " |", "|---" * (len(results) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(str(get(r)) for r in results) + " |" for name, get in ROWS]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="100", help="comma-separated run counts (default 100)")
    parser.add_argument("--modes", default="paced,burst", help="paced, burst or both (default both)")
    parser.add_argument(
        "--scope",
        choices=("namespace", "cluster"),
        default="namespace",
        help="the chart's RBAC and --namespace for the runs' namespace only, or every namespace",
    )
    parser.add_argument("--rate", type=float, default=10.0, help="paced: stage transitions per second (default 10)")
    parser.add_argument("--stage-seconds", type=float, default=1.0, help="paced: a stage Pod's run time (default 1)")
    parser.add_argument(
        "--idle-seconds", type=float, default=60.0, help="window for idle requests/s (default 60: two resyncs)"
    )
    parser.add_argument(
        "--gauge-timeout",
        type=float,
        default=60.0,
        help="after a restart, seconds to wait for the rlhf_runs gauge to count every run (default 60)",
    )
    parser.add_argument(
        "--restart-settle",
        type=float,
        default=10.0,
        help="seconds after adoption before reading the restarted operator's peak RSS",
    )
    parser.add_argument("--unrelated", type=int, default=0, help="Pods and Jobs in 10 other namespaces, created first")
    parser.add_argument(
        "--failing",
        type=int,
        default=0,
        help="paced: this many runs (spread over the creation order) fail in their first stage (their Pods exit 1);"
        " the benchmark counts which of them got their Warning event under the load (default 0)",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="limit for each wait (default 1800 s)")
    parser.add_argument(
        "--workdir", type=Path, help="keep logs and the audit log here (default: a temporary directory, removed)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a chart value other than its default (e.g. operator.workers=16); repeatable; say so with the figures",
    )
    parser.add_argument(
        "--handover",
        action="store_true",
        help="burst: stop the operator before the first wave is released and start it once every one of its"
        " Jobs is Complete: N transitions waiting at once, whatever pace the cluster side has",
    )
    args = parser.parse_args(argv)
    if args.handover and "paced" in args.modes.split(","):
        parser.error("--handover: burst mode only")
    if args.failing and "burst" in args.modes.split(","):
        parser.error("--failing: paced mode only (a burst wave waits for every run's Pod of a stage)")
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        for mode in args.modes.split(","):
            root = args.workdir or Path(tempfile.mkdtemp(prefix="rlhf-operator-load-"))
            workdir = root / f"{size}-{mode}"
            workdir.mkdir(parents=True, exist_ok=True)
            log(f"{size} runs, {mode}, {args.scope} scope (logs: {workdir})")
            try:
                results.append(run_case(args, size, mode, workdir))
            finally:
                if args.workdir is None:
                    shutil.rmtree(root, ignore_errors=True)
            if args.json:
                args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
            print(table(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
