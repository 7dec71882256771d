"""A pytest plugin that reports where the suite's CPU goes, test by test (issue 15).

Why CPU and not ``--durations``: tests/run_suite.py runs five pytest processes on a 2-core
machine that they keep saturated, so a test's wall time mostly says how busy the others were.
The CPU a test costs is what it takes from all of them: the sum over the suite is what bounds the
suite's wall time from below (total CPU / cores).

Counted per test (setup, call and teardown): this process's CPU, its children's once they are
reaped (stage subprocesses, kubectl, Helm; a daemon such as the API server is counted when a
fixture stops it, so under the test that ended the fixture), and, for node tests, the CPU of every
Pod on the node (the kubelet's ``kubepods`` cgroup: training in containers is no child of ours).
The node's kubelet, containerd and control plane are not counted: they serve the whole tier.
"""

from __future__ import annotations

import resource
from collections.abc import Generator
from pathlib import Path

import pytest

# cgroup v1 with the cgroupfs driver (rlhf_operator.dev.cluster): every Pod's cgroup is under it.
KUBEPODS_CPUACCT = Path("/sys/fs/cgroup/cpuacct/kubepods/cpuacct.usage")
SHOWN = 30

_costs: dict[str, float] = {}


def _process_cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _pods_cpu() -> float:
    try:
        return int(KUBEPODS_CPUACCT.read_text()) / 1e9
    except (OSError, ValueError):
        return 0.0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, None, None]:
    on_node = item.get_closest_marker("node") is not None
    before = _process_cpu() + (_pods_cpu() if on_node else 0.0)
    yield
    after = _process_cpu() + (_pods_cpu() if on_node else 0.0)
    _costs[item.nodeid] = after - before


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _costs:
        return
    total = sum(_costs.values())
    terminalreporter.section(f"most CPU: {min(SHOWN, len(_costs))} of {len(_costs)} tests, {total:.0f} s in all")
    for nodeid, seconds in sorted(_costs.items(), key=lambda kv: kv[1], reverse=True)[:SHOWN]:
        terminalreporter.write_line(f"{seconds:8.1f}s cpu  {nodeid}")
