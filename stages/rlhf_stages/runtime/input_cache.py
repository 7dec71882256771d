"""The input cache: hub models and datasets fetched once, shared by runs, and where a stage finds them.

Layout under the cache root (``RLHF_INPUT_CACHE``: the mount of ``storage.inputCache``, or
``.cache/inputs`` on the workspace volume)::

    <kind>/<id>/<revision>/          one entry: a complete copy, never changed once in place
        .rlhf-entry.json             what it is (kind, id, revision), when fetched, its size
        .rlhf-last-used              touched on every hit (cleanup reads its mtime)
    .incoming/<key>.<pid>.<n>/       a fetch in progress (renamed to the entry when complete)
    .locks/<key>.lock                one fetcher per entry at a time

An entry is keyed by an immutable revision (a hub commit, a deeplake version), so it is written
once and only read afterwards. A fetch goes into ``.incoming`` and is renamed into place when
complete: a reader (or a crashed fetcher's successor) sees no entry or a whole one. Two runs that
fetch the same entry at the same time take turns on an advisory lock; where the filesystem ignores
locks, both download and the second rename fails, which is a hit (the first copy is kept).

Volume paths are not cached: they are read in place and recorded with :func:`fingerprint`.
Pure standard library: the entrypoint and the operator-side tests import it without torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_api import layout
from rlhf_api.runtime import WORKSPACE_INPUT_CACHE
from rlhf_api.timestamps import format_timestamp
from rlhf_stages.runtime.atomic import fsync_dir, write_json_atomic
from rlhf_stages.runtime.context import StageContext

ENTRY_FILE = ".rlhf-entry.json"
LAST_USED_FILE = ".rlhf-last-used"
INCOMING = ".incoming"
LOCKS = ".locks"
_counter = itertools.count()


def _safe(text: str) -> str:
    """A directory name for an id or revision: readable, and unique by a short hash of the original."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "--", text).strip("-.")[:80] or "x"
    return f"{readable}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class Entry:
    path: Path
    """The complete copy."""
    hit: bool
    """Found in place (True) or fetched by this call (False)."""
    relative: str
    """``path`` relative to the cache root (what ``inputs.json`` records: the root differs per Pod)."""


class InputCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def entry_path(self, kind: str, ident: str, revision: str) -> Path:
        return self.root / kind / _safe(ident) / _safe(revision)

    def lookup(self, kind: str, ident: str, revision: str) -> Path | None:
        path = self.entry_path(kind, ident, revision)
        return path if (path / ENTRY_FILE).is_file() else None

    @contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        locks = self.root / LOCKS
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{name}.lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed, or the process dies
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def ensure(self, kind: str, ident: str, revision: str, fetch: Callable[[Path], None]) -> Entry:
        """The entry for (kind, id, revision); ``fetch(directory)`` fills an empty directory when absent."""
        final = self.entry_path(kind, ident, revision)
        relative = str(final.relative_to(self.root))
        if self.lookup(kind, ident, revision) is not None:
            self._touch(final)
            return Entry(final, True, relative)
        key = f"{kind}--{final.parent.name}--{final.name}"
        with self._locked(key):
            if self.lookup(kind, ident, revision) is not None:  # fetched by the holder we waited for
                self._touch(final)
                return Entry(final, True, relative)
            incoming = self.root / INCOMING / f"{key}.{os.getpid()}.{next(_counter)}"
            shutil.rmtree(incoming, ignore_errors=True)
            incoming.mkdir(parents=True)
            try:
                fetch(incoming)
                size = sum(f.stat().st_size for f in incoming.rglob("*") if f.is_file())
                record = {
                    "kind": kind,
                    "id": ident,
                    "revision": revision,
                    "fetchedAt": format_timestamp(),
                    "bytes": size,
                }
                write_json_atomic(incoming / ENTRY_FILE, record)
                final.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.rename(incoming, final)
                except OSError:
                    # A complete entry appeared meanwhile (a fetcher the lock did not hold back): keep it.
                    if self.lookup(kind, ident, revision) is None:
                        raise
                    self._touch(final)
                    return Entry(final, True, relative)
                fsync_dir(final.parent)
            finally:
                shutil.rmtree(incoming, ignore_errors=True)
        self._touch(final)
        return Entry(final, False, relative)

    @staticmethod
    def _touch(path: Path) -> None:
        with contextlib.suppress(OSError):  # a read-only mount: the last use is a cleanup hint, not needed
            (path / LAST_USED_FILE).touch()


def cache_root(workspace: Path) -> Path:
    """This Pod's cache root: ``RLHF_INPUT_CACHE`` (set by the operator), else the workspace's."""
    configured = os.environ.get(layout.INPUT_CACHE_ENV)
    return Path(configured) if configured else workspace / WORKSPACE_INPUT_CACHE


def fingerprint(path: Path) -> str:
    """``mtime:`` and a hash of every file's relative name, size and modification time under ``path``.

    Not a content hash: reading a 14 GB model on every run costs minutes, and whoever replaces a file
    on the volume changes its size or mtime. A changed fingerprint means a changed input."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        stat = file.stat()
        name = file.name if file == path else str(file.relative_to(path))
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return f"mtime:{digest.hexdigest()[:20]}"


# ----------------------------------------------------------------- what later stages read


def source_key(field: str, source: Any) -> str:
    """How ``inputs.json`` names a source: the spec field and the source's identity."""
    wire = source.to_wire()
    identity = {k: wire.get(k) for k in ("name", "path", "revision", "format", "subset")}
    return f"{field}:{json.dumps(identity, sort_keys=True)}"


def read_staged(run_dir: Path) -> dict[str, Any] | None:
    """The inputs stage's record for this run (None: it has not run)."""
    try:
        body: dict[str, Any] = json.loads((run_dir / layout.INPUTS_STAGE / layout.INPUTS_FILE).read_text("utf-8"))
        return body
    except (OSError, ValueError):
        return None


def staged_copy(ctx: StageContext, source: Any) -> Path | None:
    """Where the inputs stage put ``source`` (a hub id or deeplake URL), or None when it did not.

    Only while the run has an inputs stage: a record left by an earlier run of the same name is not
    read by a run that disabled the stage (it reads the hubs, as it asked)."""
    if getattr(source, "name", None) is None or not ctx.spec.stages_inputs():
        return None
    record = read_staged(ctx.run_dir)
    if record is None:
        return None
    identity = source_key("", source)[1:]
    for item in record.get("inputs", []):
        if item.get("key", "").split(":", 1)[-1] == identity and item.get("cachePath"):
            return cache_root(ctx.workspace) / item["cachePath"]
    return None


def write_staged(path: Path, inputs: list[dict[str, Any]]) -> None:
    write_json_atomic(path, {"inputs": inputs, "writtenAt": format_timestamp()})
