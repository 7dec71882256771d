"""The publish stage against a real S3-compatible server (SeaweedFS, tests/s3), and its hub call formed
from the spec (the real hub cannot be reached here: only the calls it would receive are checked).

The stage reads files and manifests and never loads a model, so the merged model here is a model-shaped
directory written without torch: a Llama config and a 6 MiB safetensors file of random weights (large
enough that the client uploads it in two parts), where merge leaves its output, with a manifest. No
tiny assets are built and nothing trains: these tests need neither torch nor the heavy-test lock.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from tests.s3 import server as s3

from conftest import read_result, run_dir, tiny_spec, write_invocation
from rlhf_api import publish as api
from rlhf_stages.runtime.context import StageContext
from rlhf_stages.runtime.entrypoint import load_invocation, main

RUN = "pub"
SPEC_CHANGES: dict[str, Any] = {
    "method": "DPO",
    "reward": None,
    "ppo": None,
    "dpo": {"dataset": {"format": "jsonl", "path": "assets/data/preferences.jsonl"}},
}


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[s3.S3Server]:
    with s3.running(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _model_dir(path: Path, seed: int) -> None:
    """config.json, generation_config.json and model.safetensors of a small random Llama-shaped model."""
    import numpy as np
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "vocab_size": 6144}
    (path / "config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    rng = np.random.default_rng(seed)
    weights = {"model.embed_tokens.weight": rng.standard_normal((6144, 256), dtype=np.float32)}  # 6 MiB
    save_file(weights, str(path / "model.safetensors"))


def _stage_output(root: Path, stage: str, metrics: dict[str, float], model: bool = False) -> None:
    """A completed stage output as the entrypoint commits it (what publish reads)."""
    out = run_dir(root, RUN) / stage
    out.mkdir(parents=True)
    if model:
        _model_dir(out / "model", seed=len(stage))
    manifest = {
        "completed": True,
        "stage": stage,
        "outputId": f"{stage}-output",
        "configHash": f"{stage}-hash-0123",
        "metrics": metrics,
        "libraries": {"transformers": "5.0"},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    """A volume holding a DPO run whose sft, dpo and merge stages are done."""
    root = tmp_path / "volume"
    _stage_output(root, "sft", {"eval_loss": 1.25})
    _stage_output(root, "dpo", {"eval_rewards/accuracies": 0.875})
    _stage_output(root, "merge", {"parameters": 1234.0}, model=True)
    return root


def _config(root: Path, endpoint: str, **publish: Any) -> Path:
    target = {"endpoint": endpoint, "bucket": s3.BUCKET, "credentials": {"secretName": "s3-keys"}}
    section = {"s3": target, **publish}
    return write_invocation(root, "publish", RUN, tiny_spec(**SPEC_CHANGES, publish=section))


def _keys(monkeypatch: pytest.MonkeyPatch, access: str = s3.ACCESS_KEY, secret: str = s3.SECRET_KEY) -> None:
    monkeypatch.setenv(api.S3_ACCESS_KEY_ID_ENV, access)
    monkeypatch.setenv(api.S3_SECRET_ACCESS_KEY_ENV, secret)
    monkeypatch.setenv(api.OPERATOR_VERSION_ENV, "9.9.9-test")


def _objects(server: s3.S3Server, prefix: str) -> dict[str, bytes]:
    client = server.client()
    found = {}
    for obj in client.list_objects(s3.BUCKET, prefix=prefix + "/", recursive=True):
        response = client.get_object(s3.BUCKET, obj.object_name)
        try:
            found[obj.object_name.removeprefix(prefix + "/")] = response.read()
        finally:
            response.close()
            response.release_conn()
    return found


def test_publish_uploads_the_model_and_card_with_checksums_and_resumes(
    s3_server: s3.S3Server, volume: Path, in_process: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _keys(monkeypatch)
    config = _config(volume, s3_server.endpoint)
    assert main(["publish", "--config", str(config)]) == 0
    result = read_result(in_process)
    prefix = f"default/{RUN}"
    uri = f"s3://{s3.BUCKET}/{prefix}/model"
    assert result["published"] == [uri]
    model = run_dir(volume, RUN) / "merge" / "model"
    objects = _objects(s3_server, prefix)
    expected = {f"model/{p.name}" for p in model.iterdir()} | {"model/README.md", api.PUBLISH_RECORD_FILE}
    assert set(objects) == expected
    for path in model.iterdir():  # what the bucket holds is byte for byte the merged model
        assert hashlib.sha256(objects[f"model/{path.name}"]).hexdigest() == _sha(path)
    record = json.loads(objects[api.PUBLISH_RECORD_FILE])
    for key, entry in record["files"].items():
        assert hashlib.sha256(objects[key]).hexdigest() == entry["sha256"] and len(objects[key]) == entry["size"]
    assert record["mergeConfigHash"] == "merge-hash-0123"
    card = objects["model/README.md"].decode()
    for fact in (
        "aligned with **DPO**",
        "assets/base-model",  # the base model
        "assets/data/preferences.jsonl",  # the dpo dataset
        "| dpo | eval_rewards/accuracies | 0.875 |",  # the evaluation table
        "| sft | eval_loss | 1.25 |",
        "`merge-hash-0123`",  # the config hash
        "rlhf-operator version: 9.9.9-test",
        "beta:",  # the dpo section's settings
    ):
        assert fact in card, fact
    manifest = json.loads((run_dir(volume, RUN) / "publish" / "manifest.json").read_text())
    assert manifest["details"]["published"] == [uri]
    assert manifest["details"]["files"]["model/config.json"]["sha256"] == _sha(model / "config.json")
    files = expected - {api.PUBLISH_RECORD_FILE}  # the record is written last, not counted as a file
    assert manifest["metrics"]["uploaded"] == manifest["metrics"]["files"] == len(files)

    # A crash after some uploads: one object is missing, one is different; no output was committed.
    client = s3_server.client()
    client.remove_object(s3.BUCKET, f"{prefix}/model/config.json")
    client.fput_object(s3.BUCKET, f"{prefix}/model/generation_config.json", str(model / "config.json"))
    shutil.rmtree(run_dir(volume, RUN) / "publish")
    assert main(["publish", "--config", str(config)]) == 0
    targets = json.loads((run_dir(volume, RUN) / "publish" / "manifest.json").read_text())["details"]["targets"]
    assert sorted(targets["s3"]["uploaded"]) == ["model/config.json", "model/generation_config.json"]
    assert len(targets["s3"]["skipped"]) == len(files) - 2
    objects = _objects(s3_server, prefix)
    for path in model.iterdir():
        assert hashlib.sha256(objects[f"model/{path.name}"]).hexdigest() == _sha(path)

    # Done once: a later start reuses the output (no network) and still reports where it went.
    monkeypatch.delenv(api.S3_SECRET_ACCESS_KEY_ENV)
    assert main(["publish", "--config", str(config)]) == 0
    again = read_result(in_process)
    assert again["published"] == [uri] and "already done" in again["message"]


def test_wrong_credentials_name_the_field_and_not_the_secret(
    s3_server: s3.S3Server, volume: Path, in_process: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    wrong = "wrong-secret-value-12345"
    _keys(monkeypatch, secret=wrong)
    assert main(["publish", "--config", str(_config(volume, s3_server.endpoint))]) == 2
    result = read_result(in_process)
    assert "spec.publish.s3.credentials" in result["message"] and "Secret s3-keys" in result["message"]
    said = result["message"] + capsys.readouterr().err
    assert wrong not in said and s3.ACCESS_KEY not in said
    assert not (run_dir(volume, RUN) / "publish").exists()


def test_missing_bucket_names_the_field(
    s3_server: s3.S3Server, volume: Path, in_process: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _keys(monkeypatch)
    config = write_invocation(
        volume,
        "publish",
        RUN,
        tiny_spec(
            **SPEC_CHANGES,
            publish={"s3": {"endpoint": s3_server.endpoint, "bucket": "absent", "credentials": {"secretName": "k"}}},
        ),
    )
    assert main(["publish", "--config", str(config)]) == 2
    assert "spec.publish.s3.bucket: bucket absent does not exist" in read_result(in_process)["message"]


def test_missing_credentials_are_refused_before_any_network(
    volume: Path, in_process: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(api.S3_ACCESS_KEY_ID_ENV, raising=False)
    monkeypatch.setenv(api.S3_SECRET_ACCESS_KEY_ENV, "x")
    # Port 9 (discard) on loopback: nothing listens; validate must fail before trying.
    assert main(["publish", "--config", str(_config(volume, "http://127.0.0.1:9"))]) == 2
    message = read_result(in_process)["message"]
    assert "spec.publish.s3.credentials.accessKeyIdKey" in message and "Secret s3-keys key AWS_ACCESS_KEY_ID" in message


def test_missing_reward_model_is_an_input_error(
    volume: Path, in_process: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _keys(monkeypatch)
    spec = tiny_spec(
        publish={"rewardModel": True, "s3": {"bucket": s3.BUCKET, "credentials": {"secretName": "k"}}}
    )  # PPO: the reward stage is in the pipeline, but has not run on this volume
    assert main(["publish", "--config", str(write_invocation(volume, "publish", RUN, spec))]) == 3
    assert "the reward stage's output" in read_result(in_process)["message"]


class FakeHub:
    """Records the calls the stage makes on huggingface_hub.HfApi."""

    calls: ClassVar[list[tuple[str, tuple[Any, ...], dict[str, Any]]]] = []
    endpoint = "https://hub.example"

    def __init__(self, token: str) -> None:
        self.calls.append(("init", (token,), {}))

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


def test_hub_commit_is_formed_from_the_spec(volume: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rlhf_stages.methods import publish

    monkeypatch.setenv(api.HUB_TOKEN_ENV, "hf_token_value")
    _stage_output(volume, "reward", {}, model=True)
    hub = {"repoId": "acme/tiny-dpo", "revision": "run-1", "private": False, "token": {"name": "hf", "key": "t"}}
    spec = tiny_spec(publish={"hub": hub, "rewardModel": True})  # PPO: has a reward stage
    ctx = StageContext.create(load_invocation(write_invocation(volume, "publish", RUN, spec)))
    publish.validate(ctx)
    files = publish.collect(publish._sources(ctx), None)
    FakeHub.calls = []
    done = publish.upload_hub(ctx, files, b"{}", api_class=FakeHub)
    assert done.uri == "https://hub.example/acme/tiny-dpo/tree/run-1"
    calls = {name: (args, kwargs) for name, args, kwargs in FakeHub.calls}
    assert calls["init"][0] == ("hf_token_value",)
    assert calls["create_repo"] == (("acme/tiny-dpo",), {"repo_type": "model", "private": False, "exist_ok": True})
    assert calls["create_branch"][1]["branch"] == "run-1"
    args, kwargs = calls["create_commit"]
    assert args == ("acme/tiny-dpo",) and kwargs["revision"] == "run-1"
    paths = {op.path_in_repo for op in kwargs["operations"]}
    assert "config.json" in paths and "reward-model/config.json" in paths and api.PUBLISH_RECORD_FILE in paths
