"""The one checkpoint protocol of every stage: ``<run>/<stage>.checkpoints/``.

A checkpoint is assembled under ``.incoming/checkpoint-<step>`` (by the HF Trainer, PPO's ranks or
ReST), then :meth:`CheckpointDir.publish` renames it to ``checkpoint-<step>``: a directory of that
name is always complete, and a kill mid-save leaves only ``.incoming`` debris, deleted before the
next attempt trains (:meth:`CheckpointDir.clear_incoming`). After a publish only the newest ``keep``
checkpoints remain. ``config-hash.json`` records the settings the checkpoints were written under
(:meth:`owner`, :meth:`record_owner`); ``outputs.claim_checkpoints`` sets aside those of other
settings before anything is resumed.

Light: no torch or transformers, so ``validate`` code and the entrypoint may use it.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_stages.runtime.atomic import fsync_dir, write_json_atomic

INCOMING = ".incoming"
OWNER_FILE = "config-hash.json"
"""``<stage>.checkpoints/config-hash.json``: the config hash the checkpoints next to it were written under."""
_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class CheckpointDir:
    root: Path
    """``<run>/<stage>.checkpoints``."""
    keep: int = 2
    """Complete checkpoints kept after a publish (the newest ones)."""
    marker: str | None = None
    """A file :meth:`publish` writes last, before the rename, and :meth:`complete` requires (PPO's
    ``state.json``): a directory renamed into place by an older layout without it is not resumed."""

    @property
    def incoming(self) -> Path:
        """Where checkpoints are assembled (the HF Trainer's ``output_dir``)."""
        return self.root / INCOMING

    def staging(self, step: int) -> Path:
        return self.incoming / f"checkpoint-{step}"

    def complete(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = [
            (int(m.group(1)), p)
            for p in self.root.iterdir()
            if (m := _NAME.match(p.name)) and p.is_dir() and (self.marker is None or (p / self.marker).is_file())
        ]
        return sorted(found)

    def latest(self) -> tuple[int, Path] | None:
        found = self.complete()
        return found[-1] if found else None

    def clear_incoming(self) -> None:
        """Drop what a killed attempt left half-written; an empty ``.incoming`` remains (rank 0, before training)."""
        shutil.rmtree(self.incoming, ignore_errors=True)
        self.incoming.mkdir(parents=True, exist_ok=True)

    def publish(self, step: int) -> Path:
        """Make ``staging(step)`` the complete ``checkpoint-<step>`` and prune old ones (rank 0 only)."""
        source, target = self.staging(step), self.root / f"checkpoint-{step}"
        if self.marker is not None:
            write_json_atomic(source / self.marker, {"step": step, "complete": True})
        if target.exists():  # the same step saved twice (a SIGTERM right after a save, a crash after a publish)
            shutil.rmtree(target)
        source.rename(target)
        fsync_dir(self.root)
        for _, old in self.complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def holds_checkpoints(self) -> bool:
        """Anything besides the owner record (complete checkpoints, debris, a stage's own files)."""
        return self.root.is_dir() and any(p.name != OWNER_FILE for p in self.root.iterdir())

    def owner(self) -> dict[str, Any] | None:
        """The owner record, or None when absent or unreadable (checkpoints of unknown origin)."""
        try:
            owner = json.loads((self.root / OWNER_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return owner if isinstance(owner, dict) else None

    def record_owner(self, body: dict[str, Any]) -> None:
        write_json_atomic(self.root / OWNER_FILE, body)
