"""Run the whole suite as five pytest processes at once: the node tier, the stage tests in two
parts, the operator's tests, and the rest.

Why: the suite is CPU-bound on the 2-core CI machine, and most of it cannot use more than one core
per process: the node tier spends most of its time waiting on a real kubelet, containerd and the
Job controller (Pods starting, a Lease changing hands, a Pod being evicted), and the other tests
train tiny models with one thread each (``OMP_NUM_THREADS=1``, tests/conftest.py) or wait on a
real API server. In one process they took 31 minutes while the whole job used 1.0 core of 2
(``/usr/bin/time``, 2026-11-30). The parts are cut where the CPU splits about evenly (each part's
summary lists its tests by CPU, tests/cputime.py), or where a part mostly waits: the learning tests
of the methods, which share one trained starting point (tests/stages/methods_support.py, so they
stay in one process and it is trained at most once), the other stage tests, the operator's tests
(most of their time is spent waiting on a real API server, an operator process and the dev kubelet),
and everything else (the CLI's quickstart, the API, chart and RBAC tests). With three parts the stage
tests, one process, ended last, 2.5 minutes after the others (23 min 48 s, c002453); with four, the
rest ended 4.6 minutes after the next (21 min 19 s, 0469f23, with 381 s of the 2 cores idle).

Each process writes its output to a log file under ``--logs``, printed whole once it ends, so
they never interleave; the exit status is the first non-zero one. Arguments after ``--`` go
to every process; when they name test paths themselves, only the node tier and one other process
run (a split by path would then select nothing or everything twice).

    python -m tests.run_suite [--logs DIR] [-- PYTEST_ARGS...]   (a module: run as a script,
    tests/ would come first on sys.path and tests/operator would shadow the standard library)
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

STAGE_TESTS = "tests/stages"
OPERATOR_TESTS = "tests/operator"
# The stage tests that start from methods_support's trained SFT policy and reward model.
METHOD_TESTS = ("test_methods_*.py", "test_watch_hacking.py", "test_watch_judge_hacking.py")


def method_test_files() -> list[str]:
    return sorted(str(path) for pattern in METHOD_TESTS for path in Path(STAGE_TESTS).glob(pattern))


@dataclass(frozen=True)
class Part:
    name: str
    args: tuple[str, ...]


# ``make test-fast``'s second part: the tests that install the chart, run KWOK and check the
# chart's RBAC against an API server; the third part takes every other quick test.
FAST_CLUSTER_TESTS = ("tests/chart", "tests/rbac", "tests/kwok")


def fast_parts() -> list[Part]:
    """``make test-fast``: every test that trains no model, needs no node and injects no minutes-long
    fault, in three parts: tests/operator (mostly waiting on an API server and operator processes),
    FAST_CLUSTER_TESTS, and the rest. In one process, with the fault tests, it took over 7 minutes for
    the first 57 % (2026-11-30); in two parts (tests/operator and the rest), 6 min 3 s with the rest
    ending 2.7 minutes after tests/operator and the 2 cores busy 63 %; in these three, 3 min 40 s,
    the parts ending within 25 s of each other, the cores busy 90 % (2026-12-01)."""
    quick = "not training and not node and not faults"
    return [
        Part("operator", ("-m", quick, OPERATOR_TESTS)),
        Part("cluster", ("-m", quick, *FAST_CLUSTER_TESTS)),
        Part(
            "rest",
            ("-m", quick, f"--ignore={OPERATOR_TESTS}", *(f"--ignore={path}" for path in FAST_CLUSTER_TESTS)),
        ),
    ]


def parts(pytest_args: list[str]) -> list[Part]:
    """The node tier, then the rest in one or four parts (see the module's docstring)."""
    node = Part("node", ("-m", "node"))
    names_paths = any(not a.startswith("-") and Path(a.split("::")[0]).exists() for a in pytest_args)
    if names_paths:
        return [node, Part("rest", ("-m", "not node"))]
    methods = method_test_files()
    return [
        node,
        Part("methods", ("-m", "not node", *methods)),
        Part("stages", ("-m", "not node", STAGE_TESTS, *(f"--ignore={path}" for path in methods))),
        Part("operator", ("-m", "not node", OPERATOR_TESTS)),
        Part("rest", ("-m", "not node", f"--ignore={STAGE_TESTS}", f"--ignore={OPERATOR_TESTS}")),
    ]


def machine_busy_seconds() -> float:
    """CPU seconds every core of this machine spent on anything but idle and I/O wait since boot
    (/proc/stat): with the containers and the cluster's daemons, which no rusage of ours counts."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle, iowait = fields[3], fields[4]
    return (sum(fields[:8]) - idle - iowait) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logs", type=Path, default=Path(".pytest-logs"))
    parser.add_argument("--fast", action="store_true", help="only the tests that train nothing and need no node")
    parser.add_argument("pytest_args", nargs="*")
    args = parser.parse_args(argv)
    args.logs.mkdir(parents=True, exist_ok=True)
    # The slowest tests are listed at the end of each part: where the suite's time goes (issue 15).
    pytest = [sys.executable, "-m", "pytest", "--durations=30", *args.pytest_args]
    started, busy_before = time.monotonic(), machine_busy_seconds()
    running: dict[str, tuple[subprocess.Popen[bytes], Path, Part]] = {}
    codes: dict[str, int] = {}
    try:
        for part in fast_parts() if args.fast else parts(args.pytest_args):
            log = args.logs / f"{part.name}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen([*pytest, *part.args], stdout=out, stderr=subprocess.STDOUT)
            running[part.name] = (proc, log, part)
            print(f"run_suite: {part.name} part started, its output in {log}", flush=True)
        while running:
            for name, (proc, log, part) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                codes[name] = proc.returncode
                took = time.monotonic() - started
                header = f"{name} part (pytest {' '.join(part.args)}): exit {proc.returncode} after {took:.0f} s"
                print(f"\n===== {header} =====")
                sys.stdout.write(log.read_text(encoding="utf-8", errors="replace"))
                sys.stdout.flush()
            time.sleep(1)
    except BaseException:
        for proc, _, _ in running.values():
            proc.send_signal(signal.SIGINT)  # as Ctrl-C would: pytest then runs the fixtures that stop the cluster
        for proc, _, _ in running.values():
            proc.wait()
        raise
    took = time.monotonic() - started
    print(f"run_suite: every part done in {took:.0f} s ({', '.join(f'{n}: exit {c}' for n, c in codes.items())})")
    busy = machine_busy_seconds() - busy_before
    cores = os.cpu_count() or 1
    print(f"run_suite: the machine's CPUs were busy {busy:.0f} s of {took * cores:.0f} s ({cores} cores x wall time)")
    # pytest exits 5 when a selection is empty (e.g. PYTEST_ARGS naming only non-node tests): not a failure.
    failed = [c for c in codes.values() if c not in (0, 5)]
    return failed[0] if failed else (0 if 0 in codes.values() else 5)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
