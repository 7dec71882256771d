"""The one checkpoint protocol (runtime.checkpoint_dir) and the one atomic write (runtime.atomic)."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_stages.runtime.atomic import write_json_atomic, write_jsonl_atomic
from rlhf_stages.runtime.checkpoint_dir import OWNER_FILE, CheckpointDir


def _stage(directory: CheckpointDir, step: int, content: str = "") -> None:
    directory.staging(step).mkdir(parents=True)
    (directory.staging(step) / "weights").write_text(content or str(step))


def test_publish_keeps_the_newest_and_only_published_ones_count(tmp_path: Path) -> None:
    directory = CheckpointDir(tmp_path / "sft.checkpoints", keep=2)
    assert directory.complete() == [] and directory.latest() is None
    for step in (1, 2, 3):
        _stage(directory, step)
        directory.publish(step)
    assert [s for s, _ in directory.complete()] == [2, 3]
    _stage(directory, 4)  # staged, never published: a kill mid-save
    assert directory.latest() == (3, directory.root / "checkpoint-3")
    directory.clear_incoming()
    assert directory.incoming.is_dir() and not any(directory.incoming.iterdir())


def test_the_same_step_published_twice_replaces_the_first(tmp_path: Path) -> None:
    directory = CheckpointDir(tmp_path / "c", keep=1)
    _stage(directory, 5, "first")
    directory.publish(5)
    _stage(directory, 5, "second")  # a SIGTERM right after a scheduled save saves the step again
    path = directory.publish(5)
    assert (path / "weights").read_text() == "second" and not directory.staging(5).exists()


def test_a_marker_makes_completeness_explicit(tmp_path: Path) -> None:
    directory = CheckpointDir(tmp_path / "ppo.checkpoints", marker="state.json")
    _stage(directory, 2)
    directory.publish(2)
    (directory.root / "checkpoint-3").mkdir()  # no marker: not complete
    assert directory.latest() == (2, directory.root / "checkpoint-2")
    assert json.loads((directory.root / "checkpoint-2" / "state.json").read_text()) == {"step": 2, "complete": True}


def test_owner_record(tmp_path: Path) -> None:
    directory = CheckpointDir(tmp_path / "c")
    assert directory.owner() is None and not directory.holds_checkpoints()
    directory.record_owner({"configHash": "abc"})
    assert directory.owner() == {"configHash": "abc"} and not directory.holds_checkpoints()
    (directory.root / OWNER_FILE).write_text("not json")
    assert directory.owner() is None  # unknown origin
    _stage(directory, 1)
    assert directory.holds_checkpoints()


def test_atomic_writes_leave_no_temporary(tmp_path: Path) -> None:
    write_json_atomic(tmp_path / "a" / "x.json", {"b": 1, "a": 2})
    write_json_atomic(tmp_path / "a" / "x.json", {"c": 3})
    write_jsonl_atomic(tmp_path / "a" / "rows.jsonl", [{"n": 1}, '{"n": 2}'])
    assert json.loads((tmp_path / "a" / "x.json").read_text()) == {"c": 3}
    assert (tmp_path / "a" / "rows.jsonl").read_text() == '{"n": 1}\n{"n": 2}\n'
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["rows.jsonl", "x.json"]
