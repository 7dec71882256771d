"""Faults, bounded in time (issue 14, item 4): the operator SIGKILLed over and over, the API server
down, etcd restarted. Against the real etcd + kube-apiserver, with fake stages (seconds, no training).

Each test checks the same three things: every run completes, no stage's Job is created twice
(a Job watch records every Job ever created), and no stage's result is lost (every stage's status
holds its outcome, its artifact and its metrics).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from kubernetes import client, config, watch

from .harness import Env, Process, http_get, tiny_run

pytestmark = pytest.mark.controlplane

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


def test_operator_sigkilled_at_20_seeded_points(env: Env) -> None:
    """20 SIGKILLs at seeded random moments while 3 four-stage runs are in flight (a finished run is
    replaced by a new one until the last kill), each followed at once by a restart with the same
    identity (a Deployment's pod coming back). The kill points fall anywhere from the operator's
    first reconciles (lease taken, watches opening) to the middle of its passes, between a Job's
    creation and the status that records it."""
    seed = int(os.environ.get("RLHF_FAULT_SEED", "14"))
    rng = random.Random(seed)
    env.fake_behaviour(_stages(3, 0.3))
    env.start_kubelet()
    names: list[str] = []

    def top_up() -> None:
        done = {n for n in names if (env.run(n).get("status") or {}).get("phase") == "Succeeded"}
        while len(names) - len(done) < 3:
            names.append(f"k{len(names)}")
            env.apply(tiny_run(names[-1]))

    started = time.monotonic()
    with JobWatch(env) as jobs:
        top_up()
        for kill in range(20):
            operator, port = env.start_operator("op-a", lease_duration=15)
            _wait_live(env, port)
            time.sleep(rng.uniform(0.0, 2.0))
            assert operator.alive(), f"the operator died by itself before kill {kill}:\n{operator.text()[-3000:]}"
            operator.kill()
            top_up()
        env.start_operator("op-a", lease_duration=15)
        _check_runs(env, names, jobs, steps=3)
    elapsed = time.monotonic() - started
    print(f"{len(names)} runs, 20 kills (seed {seed}), {elapsed:.0f}s")
    assert len(names) >= 4, "no run finished during the kills: the kill points tested nothing but startup"


OUTAGE_STEPS = 4  # 2 s a stage: the outage begins with every run's first stage running


def _running(env: Env, name: str, stage: str) -> bool:
    return bool(env.stage(env.run(name), stage).get("phase") == "Running")


LEASE_SECONDS = 15  # the operator's default: it stops acting 10 s (the renew deadline) into an outage


@contextmanager
def _in_flight(env: Env, names: list[str]) -> Iterator[tuple[Process, int, JobWatch]]:
    """An operator leading, with the runs applied and their first stage running."""
    env.fake_behaviour(_stages(OUTAGE_STEPS, 0.5))
    env.start_kubelet()
    operator, port = env.start_operator("op-a", lease_duration=LEASE_SECONDS)
    env.wait_for("the operator to lead", lambda: http_get(port, "/readyz")[0] == 200, timeout=60)
    with JobWatch(env) as jobs:
        for name in names:
            env.apply(tiny_run(name))
        env.wait_for("every run's first stage to run", lambda: all(_running(env, name, "sft") for name in names))
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
