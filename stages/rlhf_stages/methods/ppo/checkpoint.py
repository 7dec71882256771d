"""What a resumable PPO checkpoint holds, in the stages' one checkpoint protocol (``checkpoint_dir``).

``<run>/ppo.checkpoints/checkpoint-<step>/`` holds the trainable weights of the policy (the LoRA
adapter, or all weights) and of the value model, the optimizer, the KL controller, the step and one
RNG file per rank. It is assembled in ``.incoming/checkpoint-<step>`` by every rank, then rank 0
publishes it; ``state.json`` is written last, before the rename, and a directory without it is never
resumed from.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rlhf_stages.runtime.checkpoint_dir import CheckpointDir
from rlhf_stages.runtime.models import load_trainable_state, trainable_state

STATE_FILE = "state.json"
KEEP = 2  # the newest complete checkpoints kept; older ones are deleted after a new one is complete


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "generators": {name: g.get_state() for name, g in generators.items()},
    }


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in generators.items():
        g.set_state(state["generators"][name])


def checkpoint_dir(root: Path) -> CheckpointDir:
    """PPO's checkpoints in the stages' one protocol, with ``state.json`` as the completion marker."""
    return CheckpointDir(root, keep=KEEP, marker=STATE_FILE)


def write_shared(
    tmp: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, extra: dict[str, Any]
) -> None:
    """The parts every rank holds identically (written by rank 0 only)."""
    torch.save(trainable_state(model), tmp / "trainable.pt")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "extra.json").write_text(json.dumps({"step": step, **extra}, indent=2))


def write_rank(tmp: Path, rank: int, generators: dict[str, torch.Generator]) -> None:
    torch.save(rng_state(generators), tmp / f"rng-{rank}.pt")


def load(
    path: Path, rank: int, model: nn.Module, optimizer: torch.optim.Optimizer, generators: dict[str, torch.Generator]
) -> dict[str, Any]:
    """Restore weights, optimizer and this rank's RNG; returns extra.json (step, KL controller, history)."""
    load_trainable_state(model, torch.load(path / "trainable.pt", map_location="cpu"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    rng_file = path / f"rng-{rank}.pt"
    if rng_file.exists():  # resumed with more ranks than saved: the new ones keep their fresh seeds
        restore_rng(torch.load(rng_file, weights_only=False), generators)
    return json.loads((path / "extra.json").read_text())
