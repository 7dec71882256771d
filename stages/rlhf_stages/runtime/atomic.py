"""Atomic writes: readers (a restarted attempt, the operator, a person) see the old file or the new one,
never half of one. Every stage file that a crash could leave half-written goes through here."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary name beside ``path`` (same filesystem), fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # The pid keeps two processes (ranks, or an attempt and its leftover) off each other's temporary.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, body: Any) -> None:
    write_text_atomic(path, json.dumps(body, indent=2, sort_keys=True))


def write_jsonl_atomic(path: Path, rows: Iterable[Any]) -> None:
    """One JSON document per line; ``rows`` are dicts, or objects already rendered as JSON strings."""
    write_text_atomic(path, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a crash right after it must not undo it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
