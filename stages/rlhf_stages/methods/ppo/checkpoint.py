"""Resumable PPO checkpoints: written under a temporary name, renamed when complete.

``<run>/ppo.checkpoints/checkpoint-<step>/`` holds the trainable weights of the policy (the LoRA
adapter, or all weights) and of the value model, the optimizer, the KL controller, the step and one
RNG file per rank. ``state.json`` is written last, before the rename: a directory without it is
incomplete (a crash mid-write) and is never resumed from.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

STATE_FILE = "state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")
KEEP = 2  # the newest complete checkpoints kept; older ones are deleted after a new one is complete


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (the adapter and value model), not the frozen base weights."""
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(module.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise ValueError(f"checkpoint lacks trained parameters, e.g. {missing[:3]}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


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


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = _NAME.match(path.name)
            if match and (path / STATE_FILE).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def newest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def staging_dir(root: Path, step: int) -> Path:
    """Where checkpoint ``step`` is assembled before it becomes visible."""
    return root / f".tmp-checkpoint-{step}"


def clear_staging(root: Path) -> None:
    """Remove checkpoints a killed attempt left half-written (rank 0, before training)."""
    if root.is_dir():
        for path in root.glob(".tmp-checkpoint-*"):
            shutil.rmtree(path, ignore_errors=True)


def write_shared(
    tmp: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, extra: dict[str, Any]
) -> None:
    """The parts every rank holds identically (written by rank 0 only)."""
    torch.save(trainable_state(model), tmp / "trainable.pt")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "extra.json").write_text(json.dumps({"step": step, **extra}, indent=2))


def write_rank(tmp: Path, rank: int, generators: dict[str, torch.Generator]) -> None:
    torch.save(rng_state(generators), tmp / f"rng-{rank}.pt")


def publish(root: Path, tmp: Path, step: int) -> Path:
    """Mark ``tmp`` complete, rename it into place and prune old checkpoints (rank 0 only)."""
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, "complete": True}))
    final = root / f"checkpoint-{step}"
    if final.exists():  # the same step saved before a crash: the new one replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in complete_checkpoints(root)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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
