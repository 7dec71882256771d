"""The inputs stage and the input cache: staged once, a hit the second time, nothing stale reused.

No network: hub calls go to ``FakeHub`` (a FAKE: it resolves revisions from a dict and "downloads"
by copying the tiny model), except in the test of the real client, which talks to a FAKE hub server on
localhost (``_fake_hub_server``). No training: the tiny model is only copied.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pytest

from conftest import read_result, tiny_spec, write_invocation
from rlhf_api.layout import StageInvocation
from rlhf_stages.methods import inputs
from rlhf_stages.runtime import input_cache, models
from rlhf_stages.runtime.context import StageContext, StageInputMissing
from rlhf_stages.runtime.entrypoint import main
from rlhf_stages.runtime.input_cache import ENTRY_FILE, INCOMING, InputCache, fingerprint

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """FAKE hub: revisions resolve from a table; a download copies a local directory (the model, or
    the repository named in ``repos``)."""

    def __init__(self, model_dir: Path, commits: dict[str, str], repos: dict[str, Path] | None = None) -> None:
        self.model_dir, self.commits, self.repos = model_dir, commits, repos or {}
        self.downloads: list[tuple[str, str, str]] = []

    def resolve(self, repo_type: str, repo_id: str, revision: str) -> str:
        return self.commits[revision]

    def download(self, repo_type: str, repo_id: str, commit: str, into: str) -> None:
        self.downloads.append((repo_type, repo_id, commit))
        shutil.copytree(self.repos.get(repo_id, self.model_dir), into, dirs_exist_ok=True)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".rlhf-")
    }


def _copy_tree_slowly(source: Path, into: Path) -> None:
    for file in sorted(source.rglob("*")):
        if file.is_file():
            target = into / file.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)
            time.sleep(0.02)  # a slow download: the other stagers arrive while it is under way


def test_second_lookup_is_a_hit_and_another_revision_a_miss(workspace: Path, tmp_path: Path) -> None:
    model = workspace / "assets" / "base-model"
    cache = InputCache(tmp_path / "cache")
    fetched: list[Path] = []

    def fetch(into: Path) -> None:
        fetched.append(into)
        shutil.copytree(model, into, dirs_exist_ok=True)

    first = cache.ensure("models", "org/tiny", COMMIT, fetch)
    second = cache.ensure("models", "org/tiny", COMMIT, fetch)
    assert (first.hit, second.hit, len(fetched)) == (False, True, 1)
    assert first.path == second.path and _files(first.path) == _files(model)
    other = cache.ensure("models", "org/tiny", "f" * 40, fetch)
    assert not other.hit and other.path != first.path and len(fetched) == 2
    assert not any((tmp_path / "cache" / INCOMING).iterdir())  # no partial fetch left behind


def test_a_failed_fetch_leaves_no_entry(tmp_path: Path) -> None:
    cache = InputCache(tmp_path / "cache")

    def broken(into: Path) -> None:
        (into / "half.bin").write_bytes(b"x")
        raise ConnectionError("connection reset")

    with pytest.raises(ConnectionError):
        cache.ensure("models", "org/m", COMMIT, broken)
    assert cache.lookup("models", "org/m", COMMIT) is None
    assert not any((tmp_path / "cache" / INCOMING).iterdir())


def _stager(root: str, model: str, log: str, start: Any) -> None:
    start.wait()  # all four ask for the entry at once

    def fetch(into: Path) -> None:
        with open(log, "a") as f:
            f.write("fetch\n")
        _copy_tree_slowly(Path(model), into)

    InputCache(Path(root)).ensure("models", "org/tiny", COMMIT, fetch)


def test_concurrent_stagers_of_one_key_fetch_once_and_leave_one_whole_copy(workspace: Path, tmp_path: Path) -> None:
    model = workspace / "assets" / "base-model"
    root, log = tmp_path / "cache", tmp_path / "fetches.log"
    fork = multiprocessing.get_context("fork")
    start = fork.Barrier(4)
    procs = [fork.Process(target=_stager, args=(str(root), str(model), str(log), start)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert log.read_text().count("fetch") == 1  # the others waited on the lock and found the entry
    entry = InputCache(root).lookup("models", "org/tiny", COMMIT)
    assert entry is not None and _files(entry) == _files(model)
    assert not any((root / INCOMING).iterdir())


def test_a_writer_that_ignored_the_lock_wins_and_the_late_copy_is_dropped(workspace: Path, tmp_path: Path) -> None:
    """Where the filesystem ignores advisory locks, two fetches of one key can overlap: the rename of
    the second fails on the complete entry, which is then used (and the second copy thrown away)."""
    model = workspace / "assets" / "base-model"
    cache = InputCache(tmp_path / "cache")
    final = cache.entry_path("models", "org/tiny", COMMIT)

    def racing(into: Path) -> None:
        shutil.copytree(model, into, dirs_exist_ok=True)
        (into / "late-copy-marker").write_text("mine")
        shutil.copytree(model, final)  # the other writer finishes first
        (final / ENTRY_FILE).write_text("{}")

    entry = cache.ensure("models", "org/tiny", COMMIT, racing)
    assert entry.hit and entry.path == final and not (final / "late-copy-marker").exists()
    assert _files(final) == _files(model) and not any((tmp_path / "cache" / INCOMING).iterdir())


def test_fingerprint_changes_with_a_file_and_only_then(tmp_path: Path, workspace: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(workspace / "assets" / "data", data)
    before = fingerprint(data)
    assert fingerprint(data) == before and before.startswith("mtime:")
    rows = data / "sft.jsonl"
    rows.write_text(rows.read_text() + json.dumps({"question": "q", "response": "r"}) + "\n")
    assert fingerprint(data) != before
    assert fingerprint(rows) != fingerprint(data / "prompts.jsonl")


# ------------------------------------------------------------------ the stage, end to end (in process)


def _hub_spec() -> dict[str, Any]:
    """The tiny run with its base model named by hub id (served by FakeHub) and its data on the volume."""
    return tiny_spec(baseModel={"name": "org/tiny", "path": None, "revision": "v1"})


def _run_inputs(volume: Path, run: str, spec: dict[str, Any]) -> int:
    return main(["inputs", "--config", str(write_invocation(volume, "inputs", run, spec))])


@pytest.fixture
def volume(workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh volume with the tiny data (copied: tests change it), and an input cache beside it."""
    root = tmp_path / "volume"
    shutil.copytree(workspace / "assets" / "data", root / "assets" / "data")
    monkeypatch.setenv("RLHF_INPUT_CACHE", str(tmp_path / "shared-cache"))
    return root


def test_inputs_stage_stages_once_records_revisions_and_later_stages_read_the_copy(
    volume: Path, workspace: Path, in_process: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = FakeHub(workspace / "assets" / "base-model", {"v1": COMMIT})
    monkeypatch.setattr(inputs, "HUB", hub)
    assert _run_inputs(volume, "first", _hub_spec()) == 0
    result = read_result(in_process)
    by_field = {i["field"]: i for i in result["inputs"]}
    assert by_field["baseModel"] == {
        "field": "baseModel",
        "source": "org/tiny",
        "revision": COMMIT,
        "requested": "v1",
        "cache": "miss",
    }
    assert by_field["sft.dataset"]["cache"] == "local" and by_field["sft.dataset"]["revision"].startswith("mtime:")
    assert set(by_field) == {"baseModel", "sft.dataset", "reward.dataset", "ppo.dataset"}
    assert hub.downloads == [("model", "org/tiny", COMMIT)]

    # A later stage of the run finds the copy in the cache: no hub id left to download.
    invocation = StageInvocation.model_validate(
        {"stage": "sft", "run": {"name": "first"}, "workspace": str(volume), "spec": _hub_spec()}
    )
    located = models.locate(StageContext.create(invocation), invocation.spec.base_model)
    assert Path(located.id).is_dir() and (Path(located.id) / "config.json").is_file()
    assert located.label == "org/tiny" and located.revision is None
    from transformers import AutoModelForCausalLM  # as the training stages load it: from the copy

    from rlhf_api import Quantization

    assert models.load_tokenizer(located).pad_token is not None
    assert models.load_model(located, AutoModelForCausalLM, Quantization(), "baseModel", "float32").num_parameters() > 0
    assert Path(located.id).is_relative_to(volume.parent / "shared-cache")
    # The same run name with the stage disabled reads the hub as asked, not the record left behind.
    off = {**_hub_spec(), "inputs": {"enabled": False}}
    ctx_off = _ctx(volume, "sft", "first", off)
    assert models.locate(ctx_off, ctx_off.spec.base_model).id == "org/tiny"

    # Another run wanting the same commit: a cache hit, nothing downloaded.
    assert _run_inputs(volume, "second", _hub_spec()) == 0
    second = {i["field"]: i for i in read_result(in_process)["inputs"]}
    assert second["baseModel"]["cache"] == "hit" and second["baseModel"]["revision"] == COMMIT
    assert len(hub.downloads) == 1


def test_inputs_stage_resolves_again_and_its_output_id_follows_what_it_read(
    volume: Path, workspace: Path, in_process: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = FakeHub(workspace / "assets" / "base-model", {"v1": COMMIT})
    monkeypatch.setattr(inputs, "HUB", hub)
    manifest = volume / "runs" / "default" / "r" / "inputs" / "manifest.json"
    assert _run_inputs(volume, "r", _hub_spec()) == 0
    first = json.loads(manifest.read_text())["outputId"]
    assert _run_inputs(volume, "r", _hub_spec()) == 0  # same inputs: same id, so later stages stay reusable
    assert json.loads(manifest.read_text())["outputId"] == first
    rows = volume / "assets" / "data" / "sft.jsonl"
    rows.write_text(rows.read_text() + json.dumps({"question": "new", "response": "row"}) + "\n")
    assert _run_inputs(volume, "r", _hub_spec()) == 0  # a changed local file: a new id, nothing stale reused
    assert json.loads(manifest.read_text())["outputId"] != first
    hub.commits["v1"] = "f" * 40  # the tag moved: resolved again, fetched at the new commit
    assert _run_inputs(volume, "r", _hub_spec()) == 0
    moved = {i["field"]: i for i in read_result(in_process)["inputs"]}["baseModel"]
    assert (moved["revision"], moved["cache"]) == ("f" * 40, "miss") and len(hub.downloads) == 2


def test_a_missing_volume_input_exits_3_before_any_download(
    volume: Path, workspace: Path, in_process: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = FakeHub(workspace / "assets" / "base-model", {"v1": COMMIT})
    monkeypatch.setattr(inputs, "HUB", hub)
    spec = tiny_spec(baseModel={"name": "org/tiny", "path": None}, sft={"dataset": {"path": "assets/data/nope.jsonl"}})
    assert _run_inputs(volume, "missing", spec) == 3
    assert "nope.jsonl" in read_result(in_process)["message"] and hub.downloads == []


def _fake_hub_server(repos: dict[str, Path], commit: str) -> tuple[ThreadingHTTPServer, list[tuple[str, str, str]]]:
    """A FAKE Hugging Face hub on localhost: the four endpoints huggingface_hub's repo_info and
    snapshot_download use (revision info, tree listing, HEAD and GET of a file), serving local
    directories as repositories at one commit. Records (method, path, Authorization) of each request."""
    seen: list[tuple[str, str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _reply(self, body: bytes, headers: dict[str, str], code: int = 200) -> None:
            self.send_response(code)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            path = unquote(urlparse(self.path).path)
            seen.append((self.command, path, self.headers.get("Authorization", "")))
            parts = path.strip("/").split("/")
            if parts[0] == "api" and len(parts) >= 6 and "/".join(parts[2:4]) in repos:
                root = repos["/".join(parts[2:4])]
                files = sorted(p for p in root.rglob("*") if p.is_file())
                names = [str(p.relative_to(root)) for p in files]
                if parts[4] == "revision":
                    body: Any = {
                        "id": "/".join(parts[2:4]),
                        "sha": commit,
                        "siblings": [{"rfilename": n} for n in names],
                    }
                else:  # tree
                    body = [
                        {"type": "file", "path": n, "size": p.stat().st_size, "oid": n}
                        for n, p in zip(names, files, strict=True)
                    ]
                return self._reply(json.dumps(body).encode(), {"Content-Type": "application/json"})
            parts = parts[1:] if parts[0] == "datasets" else parts
            repo = "/".join(parts[:2])
            if repo in repos and len(parts) > 4 and parts[2:4] == ["resolve", commit]:
                data = (repos[repo] / "/".join(parts[4:])).read_bytes()
                return self._reply(data, {"X-Repo-Commit": commit, "ETag": f'"{hash(data)}"'})
            return self._reply(b'{"error": "not found"}', {"X-Error-Code": "RepoNotFound"}, 404)

        do_HEAD = do_GET  # noqa: N815 - the name http.server dispatches HEAD to

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


def test_the_real_hub_client_stages_a_model_from_a_fake_hub(
    workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """huggingface_hub itself, against _fake_hub_server: the branch resolves to the commit, the files
    arrive whole at that commit, the token Secret is sent, and an unknown repository exits 3."""
    model = workspace / "assets" / "base-model"
    server, seen = _fake_hub_server({"org/tiny": model}, COMMIT)
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        hub = inputs.HuggingFaceHub()
        assert hub.resolve("model", "org/tiny", "main") == COMMIT
        entry = InputCache(tmp_path / "cache").ensure(
            "models", "org/tiny", COMMIT, lambda into: hub.download("model", "org/tiny", COMMIT, str(into))
        )
        assert _files(entry.path) == _files(model) and not (entry.path / ".cache").exists()
        assert ("GET", "/api/models/org/tiny/revision/main", "Bearer hf_test_token") in seen
        downloads = [p for m, p, _ in seen if m == "GET" and "/resolve/" in p]
        assert downloads and all(f"/resolve/{COMMIT}/" in p for p in downloads)
        with pytest.raises(StageInputMissing, match=r"org/absent: not found or not accessible \(check the id\)"):
            hub.resolve("model", "org/absent", "main")
    finally:
        server.shutdown()


def test_sources_cover_every_model_and_dataset_of_enabled_stages() -> None:
    spec = StageInvocation.model_validate(
        {
            "stage": "inputs",
            "run": {"name": "x"},
            "spec": tiny_spec(
                tokenizer={"name": "org/tok"}, reward={"model": {"name": "org/rm"}}, ppo={"enabled": False}
            ),
        }
    ).spec
    fields = [field for field, _ in inputs.sources(spec)]
    assert fields == ["baseModel", "tokenizer", "sft.dataset", "reward.dataset", "reward.model"]
    assert input_cache.source_key("a", spec.tokenizer) != input_cache.source_key("a", spec.base_model)


def _ctx(volume: Path, stage: str, run: str, spec: dict[str, Any]) -> StageContext:
    invocation = {"stage": stage, "run": {"name": run}, "workspace": str(volume), "spec": spec}
    return StageContext.create(StageInvocation.model_validate(invocation))


def test_staged_hub_and_deeplake_datasets_are_read_from_the_cache(
    volume: Path, workspace: Path, in_process: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A hub dataset (FakeHub: a repository of one jsonl file) and a deeplake URL (deeplake's open and
    copy pointed at a local lake: a FAKE remote) are staged, then read by the stages from the copies."""
    import datasets
    import deeplake

    from rlhf_stages.runtime import data

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    repo = tmp_path / "hub-repo"
    repo.mkdir()
    shutil.copyfile(volume / "assets" / "data" / "sft.jsonl", repo / "train.jsonl")
    lake = tmp_path / "remote-lake"
    prefs = [json.loads(line) for line in (volume / "assets" / "data" / "preferences.jsonl").open()][:40]
    ds = deeplake.create(str(lake))
    for column in ("prompt", "chosen", "rejected"):
        ds.add_column(column, deeplake.types.Text())
    ds.append({c: [r[c] for r in prefs] for c in ("prompt", "chosen", "rejected")})
    ds.commit()
    real_open, real_copy = deeplake.open_read_only, deeplake.copy
    remote = "hub://org/prefs"
    monkeypatch.setattr(
        deeplake, "open_read_only", lambda url, token=None: real_open(str(lake) if url == remote else url)
    )
    monkeypatch.setattr(
        deeplake, "copy", lambda src, dst, token=None: real_copy(str(lake) if src == remote else src, dst)
    )
    hub = FakeHub(workspace / "assets" / "base-model", {"main": COMMIT}, {"org/sft-data": repo})
    monkeypatch.setattr(inputs, "HUB", hub)
    spec = tiny_spec(
        baseModel={"name": "org/tiny", "path": None},
        sft={"dataset": {"name": "org/sft-data", "path": None, "format": "huggingface", "maxSamples": 10}},
        reward={"dataset": {"name": remote, "path": None, "format": "deeplake"}},
    )
    assert _run_inputs(volume, "data", spec) == 0
    resolved = {i["field"]: i for i in read_result(in_process)["inputs"]}
    assert (resolved["sft.dataset"]["revision"], resolved["sft.dataset"]["cache"]) == (COMMIT, "miss")
    assert resolved["reward.dataset"]["revision"] == str(real_open(str(lake)).version)

    shutil.rmtree(repo)  # the "hub" is gone: only the staged copies can serve the stages now
    shutil.rmtree(lake)
    sft = _ctx(volume, "sft", "data", spec)
    rows = data.load_rows(sft, sft.config.dataset, seed=0)
    assert len(rows) == 10 and "response" in rows.column_names
    reward = _ctx(volume, "reward", "data", spec)
    assert data.load_rows(reward, reward.config.dataset, seed=0)["chosen"] == [r["chosen"] for r in prefs]


def test_the_result_carries_inputs_only_when_there_are_some_and_fits_the_termination_log() -> None:
    from rlhf_api.layout import StageResult
    from rlhf_stages.runtime.outputs import result_json

    assert "inputs" not in json.loads(result_json(StageResult(stage="sft", succeeded=True)))  # older readers
    many = [
        {"field": f"f{i}", "source": "org/" + "x" * 200, "revision": COMMIT, "requested": "main", "cache": "hit"}
        for i in range(32)
    ]
    text = result_json(StageResult.model_validate({"stage": "inputs", "succeeded": True, "inputs": many}))
    kept = json.loads(text)["inputs"]
    assert len(text.encode()) <= 4096 and 0 < len(kept) < 32 and kept[0]["field"] == "f0"
