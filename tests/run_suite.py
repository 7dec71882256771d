"""Run the whole suite as two pytest processes at once: the node tier, and everything else.

Why: the node tier spends most of its time waiting on a real kubelet, containerd and the Job
controller (Pods starting, a Lease changing hands, a Pod being evicted), while the rest of the
suite is CPU-bound training and API-server tests. Run one after the other they add up to about
31 minutes on 2 cores; side by side the waits of one overlap the work of the other.

The node tier's output goes to a log file that is printed once it ends, so the two never
interleave; the exit status is the first non-zero one. Arguments after ``--`` go to both.

    python -m tests.run_suite [--node-log PATH] [-- PYTEST_ARGS...]   (a module: run as a script,
    tests/ would come first on sys.path and tests/operator would shadow the standard library)
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--node-log", type=Path, default=Path(".pytest-node.log"))
    parser.add_argument("pytest_args", nargs="*")
    args = parser.parse_args(argv)
    # The slowest tests are listed at the end of each tier: where the suite's time goes (issue 15).
    pytest = [sys.executable, "-m", "pytest", "--durations=30", *args.pytest_args]
    started = time.monotonic()
    with open(args.node_log, "w", encoding="utf-8") as log:
        print(f"run_suite: node tier in the background, its output in {args.node_log}", flush=True)
        node = subprocess.Popen([*pytest, "-m", "node"], stdout=log, stderr=subprocess.STDOUT)
        try:
            rest = subprocess.call([*pytest, "-m", "not node"])
            node_code = node.wait()
        except BaseException:
            node.send_signal(signal.SIGINT)  # as Ctrl-C would: pytest then runs the fixtures that stop the cluster
            node.wait()
            raise
    print(f"\n===== node tier (pytest -m node), from {args.node_log} =====", flush=True)
    sys.stdout.write(args.node_log.read_text(encoding="utf-8"))
    took = time.monotonic() - started
    print(f"run_suite: both tiers done in {took:.0f} s (rest: exit {rest}, node: exit {node_code})")
    # pytest exits 5 when a selection is empty (e.g. PYTEST_ARGS naming only non-node tests): not a failure.
    codes = [c for c in (rest, node_code) if c not in (0, 5)]
    return codes[0] if codes else (0 if 0 in (rest, node_code) else 5)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
