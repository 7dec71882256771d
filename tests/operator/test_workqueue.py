"""The work queue's retry policy: exponential, capped, jittered, reset by a success."""

from __future__ import annotations

import asyncio
import itertools
import random
import time

from rlhf_operator.workqueue import Backoff, Key, WorkQueue

KEY: Key = ("ns", "run")


def test_backoff_doubles_up_to_the_cap_and_jitters_downwards() -> None:
    backoff = Backoff(base=1.0, cap=60.0, jitter=0.2, rng=random.Random(7))
    delays = [backoff.failed(KEY) for _ in range(10)]
    nominal = [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]
    for delay, top in zip(delays, nominal, strict=True):
        assert 0.8 * top <= delay <= top
    assert len({round(d, 6) for d in delays[6:]}) > 1, "capped retries of many runs must not line up"
    assert backoff.failures(KEY) == 10


def test_a_success_resets_the_backoff_of_that_key_only() -> None:
    backoff = Backoff(base=1.0, cap=60.0, jitter=0.0)
    other: Key = ("ns", "other")
    for _ in range(4):
        backoff.failed(KEY)
    backoff.failed(other)
    backoff.succeeded(KEY)
    assert backoff.failed(KEY) == 1.0
    assert backoff.failed(other) == 2.0


def test_a_failing_key_is_retried_with_growing_delays_then_recovers() -> None:
    calls: list[float] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()

        async def process(key: Key) -> None:
            calls.append(loop.time())
            if len(calls) <= 3:
                raise RuntimeError("API server unavailable")

        queue = WorkQueue(process, workers=1, backoff=Backoff(base=0.05, cap=0.2, jitter=0.0))
        queue.start()
        queue.add(KEY)
        for _ in range(200):
            if len(calls) >= 4:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # a success schedules nothing more
        await queue.stop()
        assert queue.backoff.failures(KEY) == 0

    asyncio.run(scenario())
    assert len(calls) == 4
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert gaps[0] >= 0.05 - 0.01 and gaps[1] >= 0.1 - 0.01 and gaps[2] >= 0.2 - 0.01
    assert gaps[1] > gaps[0]


def test_resync_leaves_settled_runs_alone_but_not_edited_or_moving_ones() -> None:
    from rlhf_operator.controller import settled

    def run(phase: str | None, generation: int, observed: int | None) -> dict[str, object]:
        status = {} if phase is None else {"phase": phase, "observedGeneration": observed}
        return {"metadata": {"name": "r", "namespace": "n", "generation": generation}, "status": status}

    assert settled(run("Succeeded", 3, 3))
    assert settled(run("Failed", 1, 1))
    assert not settled(run("Succeeded", 4, 3)), "an edited finished run must be reconciled"
    assert not settled(run("Running", 1, 1))
    assert not settled(run(None, 1, None)), "a new run has no status yet"


def test_urgent_keys_are_passed_first_and_a_waiting_key_can_become_urgent() -> None:
    order: list[str] = []
    waits: list[tuple[str, float]] = []

    async def scenario() -> None:
        release = asyncio.Event()

        async def process(key: Key) -> None:
            order.append(key[1])
            if key[1] == "busy":
                await release.wait()

        queue = WorkQueue(process, workers=1, waited=lambda lane, seconds: waits.append((lane, seconds)))
        queue.start()
        queue.add(("ns", "busy"))
        await asyncio.sleep(0.01)  # the one worker is held
        for name in ("pod-1", "pod-2", "pod-3"):
            queue.add(("ns", name))
        await asyncio.sleep(0.05)
        queue.add(("ns", "finished"), urgent=True)
        queue.add(("ns", "pod-2"), urgent=True)  # its Job finished while it waited: moves up, passed once
        queue.add(("ns", "busy"), urgent=True)  # while being passed: once more, urgent
        assert queue.waiting() == (2, 2)
        await asyncio.sleep(0.02)  # what the waiting keys wait
        release.set()
        for _ in range(100):
            if len(order) == 6:
                break
            await asyncio.sleep(0.01)
        await queue.stop()

    asyncio.run(scenario())
    assert order == ["busy", "finished", "pod-2", "busy", "pod-1", "pod-3"]
    assert [lane for lane, _ in waits] == ["normal", "urgent", "urgent", "urgent", "normal", "normal"]
    assert min(seconds for _, seconds in waits[1:]) >= 0.02, "each pass reports its wait in the queue"
    pod_1, pod_2 = waits[4][1], waits[2][1]
    assert pod_1 >= pod_2 + 0.04, "an urgent wait counts from when the key became urgent"


def test_a_finished_job_and_a_new_or_edited_run_are_urgent() -> None:
    from rlhf_operator.handlers import run_is_new_or_edited
    from rlhf_operator.observe import job_finished

    def job(kind: str, status: str = "True") -> dict[str, object]:
        return {"status": {"conditions": [{"type": kind, "status": status}]}}

    assert job_finished(job("Complete")) and job_finished(job("Failed"))
    assert not job_finished(job("Complete", "False")) and not job_finished(job("Suspended"))
    assert not job_finished({"status": {"active": 1}})
    run = {"metadata": {"generation": 2}, "status": {"observedGeneration": 2}}
    assert not run_is_new_or_edited(run), "its own status write coming back is not urgent"
    assert run_is_new_or_edited({"metadata": {"generation": 1}})
    assert run_is_new_or_edited({"metadata": {"generation": 3}, "status": {"observedGeneration": 2}})


def test_a_pass_that_needs_no_poll_drops_the_pending_one() -> None:
    """A running stage's pass asks for a progress poll; the stage's end comes first (a 1-second Pod
    under load): the poll would be a pass with nothing to do, one per stage seen running."""
    from rlhf_operator.cache import WatchCache
    from rlhf_operator.controller import Controller
    from rlhf_operator.health import Health
    from rlhf_operator.metrics import Metrics

    passes: list[float | None] = []
    answers = [0.3, None]  # running (poll in 0.3 s), then finished (nothing to poll)

    class Reconciler:
        def reconcile(self, namespace: str, name: str) -> float | None:
            passes.append(answers[len(passes)] if len(passes) < len(answers) else None)
            return passes[-1]

    async def scenario() -> None:
        metrics = Metrics()
        controller = Controller(None, WatchCache(), metrics, Health(), None)  # type: ignore[arg-type]
        controller.reconciler = Reconciler()  # type: ignore[assignment]
        controller.queue.start()
        controller.queue.add(KEY)
        await asyncio.sleep(0.1)
        controller.queue.add(KEY, urgent=True)  # its Job finished
        await asyncio.sleep(0.5)  # past the poll's time
        await controller.queue.stop()
        assert metrics.polls_cancelled._value.get() == 1

    asyncio.run(scenario())
    assert passes == [0.3, None], "no third pass: the poll was dropped"


def test_passes_run_on_one_thread_per_worker() -> None:
    """Passes run on the controller's own pool, as many threads as workers: asyncio's default
    executor would grow with the node's cores (each thread a glibc arena kept by the process)."""
    import threading

    from rlhf_operator.cache import WatchCache
    from rlhf_operator.controller import Controller
    from rlhf_operator.health import Health
    from rlhf_operator.metrics import Metrics

    threads: list[str] = []
    lock = threading.Lock()

    class Reconciler:
        def reconcile(self, namespace: str, name: str) -> None:
            with lock:
                threads.append(threading.current_thread().name)
            time.sleep(0.05)  # long enough that every worker is busy at once

    async def scenario() -> None:
        controller = Controller(None, WatchCache(), Metrics(), Health(), None, workers=3)  # type: ignore[arg-type]
        controller.reconciler = Reconciler()  # type: ignore[assignment]
        controller.queue.start()
        for index in range(30):
            controller.queue.add(("ns", f"run-{index}"))
        for _ in range(500):
            if len(threads) == 30:
                break
            await asyncio.sleep(0.02)
        await controller.queue.stop()

    asyncio.run(scenario())
    assert len(threads) == 30, "every key passed once"
    assert len(set(threads)) == 3, set(threads)
    assert all(name.startswith("pass_") for name in threads), threads
