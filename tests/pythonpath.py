"""The environment for the Python subprocesses tests start (``python -m rlhf_operator ...``, stages).

pytest finds this checkout's packages through ``pythonpath`` in pyproject.toml, but that only
changes its own ``sys.path``; a child interpreter needs PYTHONPATH. Tests must not rely on the
Makefile exporting it (plain ``pytest`` does not), nor inherit one that points at another clone.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What the images' PYTHONPATH=/app holds: both packages.
PYTHON_PATH = os.pathsep.join([str(REPO / "operator"), str(REPO / "stages")])


def python_env(*, inherit: bool = True, **extra: str) -> dict[str, str]:
    """This process's environment (none of it with ``inherit=False``), PYTHONPATH set to this
    checkout's packages, then ``extra``."""
    env = dict(os.environ) if inherit else {}
    env["PYTHONPATH"] = PYTHON_PATH
    env.update(extra)
    return env
