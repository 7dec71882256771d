"""Expensive test set-ups built once per machine, under the cache root, keyed by everything they read.

Like the control plane's binaries and the stage images, a trained test fixture (the tiny RLAIF
judge, the SFT policy and reward model the learning tests start from) is the same for the same
inputs: the tiny assets, the stage and API code, its settings and the libraries that run it. It is
built once into ``<cache root>/<name>-<key>`` (``rlhf_operator.dev.host.cache_root``: the same root
``make`` uses) and reused by every later session and clone until one of those inputs changes. A
complete entry is renamed into place in one step, so a crashed or concurrent build never leaves a
half-written entry that looks complete.

What a test asserts about training itself (tests/stages/test_pipeline.py, the quickstart, the
method stages under test) still trains every time: only the starting points of other tests come
from here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from rlhf_operator.dev.host import cache_root
from tests.pythonpath import REPO

# Trained on CPU by these; another version may compute other weights from the same inputs.
LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate")
UNUSED_FOR_S = 7 * 24 * 3600
# Trained into the assets directory by the tests, never read by what it keys.
ASSET_OUTPUTS = ("judge",)


def digest(groups: Mapping[Path, Iterable[Path]], extra: Iterable[str] = ()) -> str:
    """sha256 over each file's path relative to its group's root (so the same inputs in another
    temporary directory or clone give the same key) and its content, then ``extra``."""
    h = hashlib.sha256()
    for root, files in sorted(groups.items()):
        for path in sorted(files):
            h.update(str(path.relative_to(root)).encode() + b"\0")
            h.update(path.read_bytes() + b"\0")
    for item in extra:
        h.update(item.encode() + b"\0")
    return h.hexdigest()


def python_sources(*packages: Path) -> list[Path]:
    """Every ``.py`` file under the package directories (conservative: any edit there rebuilds)."""
    return [p for package in packages for p in package.rglob("*.py") if "__pycache__" not in p.parts]


def library_versions(*names: str) -> list[str]:
    """``name==version`` of installed distributions: another torch may train to other weights."""
    return [f"{name}=={metadata.version(name)}" for name in names]


def training_key(assets: Path, settings: Mapping[str, Any]) -> str:
    """The key of something trained on the tiny assets in ``assets`` with ``settings``: every asset
    file, every source file of the stages and of the API they read, the settings and the libraries."""
    import rlhf_api
    import rlhf_stages

    asset_files = [p for p in assets.rglob("*") if p.is_file() and p.relative_to(assets).parts[0] not in ASSET_OUTPUTS]
    code = python_sources(Path(rlhf_stages.__file__).parent, Path(rlhf_api.__file__).parent)
    return digest(
        {assets: asset_files, REPO: code},
        extra=[json.dumps(settings, sort_keys=True), *library_versions(*LIBRARIES)],
    )


def cached_build(name: str, key: str, build: Callable[[Path], object]) -> Path:
    """The directory ``build`` fills for ``key``: built now if no complete one is cached."""
    entry = cache_root() / f"{name}-{key[:16]}"
    if entry.is_dir():
        os.utime(entry)  # in use: not pruned
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    _prune(entry.parent, name)
    scratch = entry.parent / f".{entry.name}.{os.getpid()}.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        build(scratch)
        try:
            scratch.rename(entry)
        except OSError:
            if not entry.is_dir():  # not another process that finished first: a real error
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return entry


def _prune(root: Path, name: str) -> None:
    """Remove ``name``'s entries unused for a week: every edit of the stages makes a new key, and an
    entry another clone still uses was touched by it more recently."""
    for old in root.glob(f"{name}-*"):
        if old.is_dir() and time.time() - old.stat().st_mtime > UNUSED_FOR_S:
            shutil.rmtree(old, ignore_errors=True)


def cached_outputs(name: str, key: str, target: Path, train: Callable[[], object]) -> None:
    """Fill ``target`` (a run directory not there yet) with what ``train`` leaves there, training only
    when no entry for ``key`` is cached. The caller still starts its stages afterwards: a complete
    output of the same settings makes a stage exit at once, anything else trains again (the stages'
    own reuse check, which also decides about a ``target`` that exists already)."""
    if target.exists():
        return

    def build(out: Path) -> None:
        train()
        shutil.copytree(target, out, symlinks=True)

    entry = cached_build(name, key, build)
    shutil.copytree(entry, target, symlinks=True, dirs_exist_ok=True)
