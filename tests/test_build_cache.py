"""The build cache of trained test fixtures (tests/build_cache.py): built once per key, never half."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests import build_cache


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("RLHF_CACHE_DIR", str(root))
    return root


def _write(out: Path, text: str) -> None:
    out.mkdir(parents=True)
    (out / "weights").write_text(text)


def test_built_once_per_key_then_reused(cache_dir: Path) -> None:
    builds: list[str] = []

    def build(out: Path) -> None:
        builds.append(out.name)
        _write(out, "trained")

    first = build_cache.cached_build("judge", "a" * 64, build)
    again = build_cache.cached_build("judge", "a" * 64, build)
    other = build_cache.cached_build("judge", "b" * 64, build)
    assert first == again != other
    assert len(builds) == 2 and (first / "weights").read_text() == "trained"
    assert sorted(p.name for p in cache_dir.iterdir()) == [f"judge-{'a' * 16}", f"judge-{'b' * 16}"]


def test_a_failed_build_leaves_no_entry(cache_dir: Path) -> None:
    def build(out: Path) -> None:
        _write(out, "half")
        raise RuntimeError("killed mid-training")

    with pytest.raises(RuntimeError):
        build_cache.cached_build("judge", "c" * 64, build)
    assert list(cache_dir.iterdir()) == []  # neither the entry nor the scratch directory
    built = build_cache.cached_build("judge", "c" * 64, lambda out: _write(out, "whole"))
    assert (built / "weights").read_text() == "whole"


def test_entries_unused_for_a_week_are_pruned_on_the_next_build(cache_dir: Path) -> None:
    stale = build_cache.cached_build("base", "d" * 64, lambda out: _write(out, "old code"))
    used = build_cache.cached_build("base", "e" * 64, lambda out: _write(out, "other clone"))
    week_ago = time.time() - build_cache.UNUSED_FOR_S - 60
    os.utime(stale, (week_ago, week_ago))
    os.utime(used, (week_ago, week_ago))
    build_cache.cached_build("base", "e" * 64, lambda out: _write(out, "unused"))  # a hit: touches it
    build_cache.cached_build("base", "f" * 64, lambda out: _write(out, "new code"))
    assert not stale.exists() and (used / "weights").read_text() == "other clone"


def test_the_key_follows_content_not_the_directory_it_is_in(tmp_path: Path) -> None:
    def key(root: Path, text: str) -> str:
        (root / "data").mkdir(parents=True)
        (root / "data" / "sft.jsonl").write_text(text)
        return build_cache.digest({root: [root / "data" / "sft.jsonl"]}, extra=["steps=500"])

    assert key(tmp_path / "one", "rows") == key(tmp_path / "two", "rows") != key(tmp_path / "three", "other rows")


def test_cached_outputs_restore_a_run_directory_and_leave_an_existing_one_alone(tmp_path: Path) -> None:
    trained: list[Path] = []

    def train_into(target: Path) -> None:
        trained.append(target)
        _write(target / "sft", "sft weights")

    first, second = tmp_path / "session-1" / "run", tmp_path / "session-2" / "run"
    build_cache.cached_outputs("base", "g" * 64, first, lambda: train_into(first))
    build_cache.cached_outputs("base", "g" * 64, second, lambda: train_into(second))
    assert trained == [first] and (second / "sft" / "weights").read_text() == "sft weights"
    (second / "sft" / "weights").write_text("trained here")
    build_cache.cached_outputs("base", "g" * 64, second, lambda: train_into(second))
    assert (second / "sft" / "weights").read_text() == "trained here"  # the stages' reuse check decides
