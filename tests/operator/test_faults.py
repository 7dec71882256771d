"""Faults, bounded in time (issue 14, item 4): the operator SIGKILLed over and over, the API server
down, etcd restarted, the leader of two replicas cut off from the API server. Against the real etcd +
kube-apiserver, with fake stages (seconds, no training). About 3 minutes in all.

Each test checks the same three things: every run completes, no stage's Job is created twice
(a Job watch records every Job ever created), and no stage's result is lost (every stage's status
holds its outcome, its artifact and its metrics).
"""

from __future__ import annotations

import os
import random
import re
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config, watch

from .harness import Env, Process, http_get, tiny_run

pytestmark = [pytest.mark.controlplane, pytest.mark.faults]

STAGES = ["sft", "reward", "ppo", "merge"]


def _stages(steps: int, step_seconds: float) -> dict[str, dict[str, float]]:
    """The fake stages' behaviour: every stage takes ``steps`` steps of ``step_seconds``."""
    return {stage: {"steps": steps, "stepSeconds": step_seconds} for stage in STAGES}


class JobWatch:
    """Every Job created in a namespace, by name, as uids in order: two uids under one name is a
    duplicate (created, deleted, created again). Polling could miss a Job deleted between two looks;
    the watch cannot, and it resumes from the last resourceVersion it saw across API outages."""

    def __init__(self, env: Env) -> None:
        api = config.new_client_from_config(config_file=str(env.plane.kubeconfig()))
        api.configuration.retries = 0  # the loop retries; urllib3's would only log a warning each time
        self.api = client.BatchV1Api(api)
        self.namespace = env.namespace
        self.uids: dict[str, list[str]] = defaultdict(list)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="job-watch", daemon=True)

    def __enter__(self) -> JobWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _seen(self, job: Any) -> None:
        uids = self.uids[job.metadata.name]
        if job.metadata.uid not in uids:
            uids.append(job.metadata.uid)

    def _loop(self) -> None:
        version = None
        while not self._stop.is_set():
            try:
                if version is None:
                    listed = self.api.list_namespaced_job(self.namespace)
                    for job in listed.items:
                        self._seen(job)
                    version = listed.metadata.resource_version if listed.metadata else None
                stream = watch.Watch().stream(
                    self.api.list_namespaced_job, self.namespace, resource_version=version, timeout_seconds=2
                )
                for event in stream:
                    self._seen(event["object"])
                    version = event["object"].metadata.resource_version
            except client.ApiException as exc:
                if exc.status == 410:  # compacted (etcd restart): list again; uids already seen stay
                    version = None
                time.sleep(0.5)
            except Exception:  # the API server is down: try again
                time.sleep(0.5)

    def duplicates(self) -> dict[str, list[str]]:
        return {name: uids for name, uids in self.uids.items() if len(uids) > 1}


def _check_runs(env: Env, names: list[str], jobs: JobWatch, steps: int) -> None:
    """Every run Succeeded, each stage ran once in one Job, and each stage's result is in the status."""
    for name in names:
        run = env.wait_phase(name, "Succeeded", timeout=60)
        stages = {s["name"]: s for s in run["status"]["stages"]}
        assert list(stages) == STAGES
        for stage in STAGES:
            entry = stages[stage]
            assert entry["phase"] == "Succeeded", (name, entry)
            assert entry["jobName"] == f"{name}-{stage}"
            assert entry["artifactPath"] == f"runs/{env.namespace}/{name}/{stage}", (name, entry)
            assert entry["metrics"]["loss"] == pytest.approx(1.0 / steps), (name, entry)
            assert entry["attempts"] == 1, (name, entry)
        assert run["status"]["reward"] == 0.75  # ppo's reward_mean, carried to the run
        assert env.starts(name) == [f"{stage} 0" for stage in STAGES], f"{name}: a stage ran twice or was skipped"
        assert set(jobs.uids) >= {f"{name}-{stage}" for stage in STAGES}
    assert jobs.duplicates() == {}, "a stage's Job was created twice"


def _wait_live(env: Env, port: int) -> None:
    env.wait_for("the operator to be live", lambda: http_get(port, "/healthz")[0] == 200, timeout=60, every=0.1)


def _finished(env: Env, names: list[str]) -> int:
    return sum((env.run(n).get("status") or {}).get("phase") == "Succeeded" for n in names)


def test_operator_sigkilled_at_20_seeded_points(env: Env) -> None:
    """20 SIGKILLs at seeded random moments while 3 four-stage runs are in flight (a finished run is
    replaced by a new one until the last kill), each followed at once by a restart with the same
    identity (a Deployment's pod coming back). The kill points spread from the operator's start
    (lease taken, watches opening, first passes) into its steady state, so some land inside passes,
    for instance between a Job's creation and the status write that records it."""
    seed = int(os.environ.get("RLHF_FAULT_SEED", "14"))
    rng = random.Random(seed)
    env.fake_behaviour(_stages(3, 0.3))
    env.start_kubelet()
    names: list[str] = []

    def top_up() -> None:
        while len(names) - _finished(env, names) < 3:
            names.append(f"k{len(names)}")
            env.apply(tiny_run(names[-1]))

    started = time.monotonic()
    with JobWatch(env) as jobs:
        top_up()
        for kill in range(20):
            finished = _finished(env, names)
            operator, port = env.start_operator("op-a", lease_duration=15)
            _wait_live(env, port)
            if kill % 5 == 4:
                # Every fifth life lasts until a run finishes in it: wall-clock kill points alone, on a
                # loaded machine, all fell before any stage ended (only start-up was tested).
                env.wait_for("a run to finish", lambda before=finished: _finished(env, names) > before, timeout=120)
            time.sleep(rng.uniform(0.0, 2.0))
            assert operator.alive(), f"the operator died by itself before kill {kill}:\n{operator.text()[-3000:]}"
            operator.kill()
            top_up()
        env.start_operator("op-a", lease_duration=15)
        _check_runs(env, names, jobs, steps=3)
    elapsed = time.monotonic() - started
    print(f"{len(names)} runs, 20 kills (seed {seed}), {elapsed:.0f}s")
    assert len(names) >= 4, "no run finished during the kills: the kill points tested nothing but startup"


OUTAGE_STEPS, OUTAGE_STEP_SECONDS = 4, 0.3  # the outages begin while every run is running a stage


def _running(env: Env, name: str) -> bool:
    """One of the run's stages is running (with stages this short, the first may be over already)."""
    return any(s.get("phase") == "Running" for s in (env.run(name).get("status") or {}).get("stages") or [])


LEASE_SECONDS = 15  # the operator's default: it stops acting 10 s (the renew deadline) into an outage


@contextmanager
def _in_flight(env: Env, names: list[str]) -> Iterator[tuple[Process, int, JobWatch]]:
    """An operator leading, with the runs applied and each running a stage."""
    env.fake_behaviour(_stages(OUTAGE_STEPS, OUTAGE_STEP_SECONDS))
    env.start_kubelet()
    operator, port = env.start_operator("op-a", lease_duration=LEASE_SECONDS)
    env.wait_for("the operator to lead", lambda: http_get(port, "/readyz")[0] == 200, timeout=60)
    with JobWatch(env) as jobs:
        for name in names:
            env.apply(tiny_run(name))
        env.wait_for("every run to be running a stage", lambda: all(_running(env, name) for name in names))
        yield operator, port, jobs


def _outage(env: Env, component: str, seconds: float) -> None:
    names = ["o1", "o2"]
    with _in_flight(env, names) as (operator, port, jobs):
        pid = operator.popen.pid
        with env.plane.stopped(component):
            time.sleep(seconds)
            assert operator.alive(), f"the operator exited during the outage:\n{operator.text()[-3000:]}"
            if seconds > LEASE_SECONDS:  # past the renew deadline: it must have stopped acting
                assert http_get(port, "/readyz") == (503, "standby: not the leader\n")
        _check_runs(env, names, jobs, OUTAGE_STEPS)
        assert operator.alive() and operator.popen.pid == pid, "the operator restarted"
        assert http_get(port, "/readyz")[0] == 200, "leading and acting again"


# The suite's outages; longer ones by hand (the suite's budget for this file is 3 minutes).
APISERVER_DOWN_SECONDS = float(os.environ.get("RLHF_FAULT_APISERVER_SECONDS", "30"))
ETCD_DOWN_SECONDS = float(os.environ.get("RLHF_FAULT_ETCD_SECONDS", "5"))


def test_apiserver_down_operator_recovers_in_place(env: Env) -> None:
    """kube-apiserver stopped (etcd and its data kept) while runs are in flight: the operator rides
    it out in the same process and the runs complete. The suite tests 30 s; the issue also asks for
    2 minutes, which is too long for the suite's budget: run it by hand with
    RLHF_FAULT_APISERVER_SECONDS=120 pytest tests/operator/test_faults.py -k apiserver."""
    _outage(env, "kube-apiserver", APISERVER_DOWN_SECONDS)


def test_etcd_restarted_operator_recovers_in_place(env: Env) -> None:
    """etcd stopped and started again on the same data dir while runs are in flight (the API server
    stays up and answers errors meanwhile): same outcome. etcd's shutdown, restart and the API
    server's return to ready add about 10 s to the ``RLHF_FAULT_ETCD_SECONDS`` (default 5) it is down."""
    _outage(env, "etcd", ETCD_DOWN_SECONDS)


class LoopbackProxy:
    """A TCP relay to the API server that can be cut like a network partition: open connections are
    dropped and new ones are accepted but never answered (a black hole, not a refusal, so clients
    wait out their timeouts as they would behind a dead link), until ``heal``."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.partitioned = threading.Event()
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return  # closed
            with self._lock:
                self._open.append(conn)
            if self.partitioned.is_set():
                continue  # held open, never answered
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._open.append(upstream)
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with suppress(OSError):
            while data := src.recv(65536):
                if self.partitioned.is_set():
                    break
                dst.sendall(data)
        for sock in (src, dst):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _drop_all(self) -> None:
        with self._lock:
            socks, self._open = self._open, []
        for sock in socks:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def partition(self) -> None:
        self.partitioned.set()
        self._drop_all()

    def heal(self) -> None:
        self.partitioned.clear()
        self._drop_all()  # the held connections: their clients reconnect through the relay

    def close(self) -> None:
        self.server.close()
        self._drop_all()


def _logged_at(process: Process, message: str, since: datetime) -> datetime | None:
    """When the process first logged a line containing ``message`` at or after ``since`` (local
    time, as its logging's asctime)."""
    for line in process.text().splitlines():
        stamp = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})", line)
        if stamp and message in line:
            at = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f")
            if at >= since:
                return at
    return None


def test_leader_cut_off_stops_before_the_standby_takes_over(env: Env, tmp_path: Path) -> None:
    """Two replicas; the leader reaches the API server through a loopback proxy, which is then cut.
    The standby takes the Lease once it expires; the old leader must have stopped acting before that
    (its renew deadline is 2/3 of the Lease, as client-go's), so two leaders never act at once. When
    the link heals, the old leader finds the Lease taken and stays a standby, in the same process."""
    lease = 6.0
    env.fake_behaviour(_stages(OUTAGE_STEPS, OUTAGE_STEP_SECONDS))
    env.start_kubelet()
    host, port = env.plane.url.removeprefix("https://").split(":")
    proxy = LoopbackProxy((host, int(port)))
    proxied = tmp_path / "kubeconfig-via-proxy"
    proxied.write_text(
        env.plane.kubeconfig(env.plane.operator).read_text().replace(env.plane.url, f"https://{host}:{proxy.port}")
    )
    try:
        leader, leader_port = env.start_operator("op-a", lease_duration=lease, kubeconfig=proxied)
        env.wait_for("op-a to lead", lambda: http_get(leader_port, "/readyz")[0] == 200, timeout=60)
        standby, standby_port = env.start_operator("op-b", lease_duration=lease)
        env.wait_for("op-b to be live", lambda: http_get(standby_port, "/healthz")[0] == 200, timeout=60)
        with JobWatch(env) as jobs:
            env.apply(tiny_run("iso"))
            env.wait_for("iso to be running a stage", lambda: _running(env, "iso"))
            cut = datetime.now() - timedelta(milliseconds=1)  # the logs' local time, whose stamps have ms
            proxy.partition()
            env.wait_for("op-b to take over", lambda: http_get(standby_port, "/readyz")[0] == 200, timeout=60)
            stopped = _logged_at(leader, "not the leader any more", cut)
            took_over = _logged_at(standby, "became leader (op-b)", cut)
            assert stopped is not None and took_over is not None
            assert stopped < took_over, f"op-a stopped acting at {stopped}, after op-b took over at {took_over}"
            assert http_get(leader_port, "/readyz")[0] == 503
            proxy.heal()
            _check_runs(env, ["iso"], jobs, OUTAGE_STEPS)
        # Healed for the whole rest of the run: op-a saw op-b's live Lease and never led again.
        assert http_get(leader_port, "/readyz")[0] == 503
        assert leader.alive() and standby.alive()
        assert leader.text().count("became leader (op-a)") == 1
    finally:
        proxy.close()
