"""spec.publish on the operator's side: the stage runs last, only its Pod gets the credentials (by
Secret reference), and where the result went reaches the run's status and `rlhfctl status`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rlhf_api import publish as api
from rlhf_api.layout import RunRef, StageResult
from rlhf_api.run import RLHFRunSpec
from rlhf_api.validation import validate_manifest
from rlhf_operator import __version__
from rlhf_operator.children import build_job
from rlhf_operator.cli.cluster import render_status
from rlhf_operator.observe import JobObservation, Observed
from rlhf_operator.planner import RunView, plan

from .harness import tiny_run

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
PUBLISH = {
    "s3": {"endpoint": "http://s3.storage:8333", "bucket": "models", "credentials": {"secretName": "s3-keys"}},
    "hub": {"repoId": "acme/tiny", "token": {"name": "hub-write", "key": "token"}},
}
URIS = ["s3://models/ns/tiny/model", "https://huggingface.co/acme/tiny/tree/main"]


def spec(**publish: Any) -> RLHFRunSpec:
    return RLHFRunSpec.model_validate(tiny_run(publish={**PUBLISH, **publish})["spec"], strict=False)


def env_of(s: RLHFRunSpec, stage: str) -> dict[str, Any]:
    job = build_job(RunRef(namespace="ns", name="tiny", uid="u"), s, stage)
    return {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_publish_runs_last_and_only_its_pod_gets_the_credentials_by_reference() -> None:
    s = spec()
    assert s.pipeline() == ("sft", "reward", "ppo", "merge", "publish")
    env = env_of(s, "publish")
    assert env[api.S3_ACCESS_KEY_ID_ENV]["valueFrom"] == {
        "secretKeyRef": {"name": "s3-keys", "key": "AWS_ACCESS_KEY_ID"}
    }
    assert env[api.S3_SECRET_ACCESS_KEY_ENV]["valueFrom"]["secretKeyRef"]["key"] == "AWS_SECRET_ACCESS_KEY"
    assert env[api.HUB_TOKEN_ENV]["valueFrom"] == {"secretKeyRef": {"name": "hub-write", "key": "token"}}
    assert env[api.OPERATOR_VERSION_ENV]["value"] == __version__
    merge = env_of(s, "merge")
    assert not {api.S3_ACCESS_KEY_ID_ENV, api.S3_SECRET_ACCESS_KEY_ENV, api.HUB_TOKEN_ENV} & set(merge)
    # Without hub.token, the run's hfToken is the hub token.
    fallback = RLHFRunSpec.model_validate(
        tiny_run(publish={"hub": {"repoId": "acme/tiny"}}, secrets={"hfToken": {"name": "hf", "key": "t"}})["spec"],
        strict=False,
    )
    assert env_of(fallback, "publish")[api.HUB_TOKEN_ENV]["valueFrom"]["secretKeyRef"]["name"] == "hf"
    assert RLHFRunSpec.model_validate(tiny_run()["spec"], strict=False).pipeline()[-1] == "merge"


def test_publish_rules_name_the_field() -> None:
    cases = {
        "spec.publish: publish needs a target": {},
        "spec.publish.rewardModel": {"rewardModel": True, "s3": PUBLISH["s3"]},
        "spec.publish.hub.token": {"hub": {"repoId": "acme/tiny"}},
        "spec.publish.s3.prefix": {"s3": {**PUBLISH["s3"], "prefix": "models/../x"}},
        "spec.publish.s3.bucket": {"s3": {**PUBLISH["s3"], "bucket": "Models_Bucket"}},
    }
    for expected, publish in cases.items():
        method = {"method": "DPO", "dpo": {"dataset": {"name": "a/b"}}} if "rewardModel" in publish else {}
        _, errors = validate_manifest(tiny_run(publish=publish, **method))
        assert any(e.startswith(expected) for e in errors), (expected, errors)
    _, errors = validate_manifest(tiny_run(publish=PUBLISH, merge={"enabled": False}))
    assert any(e.startswith("spec.publish: publish uploads the merged model") for e in errors), errors


def done(stage: str, published: list[str] | None = None) -> JobObservation:
    result = StageResult(stage=stage, succeeded=True, published=published or [])
    return JobObservation(
        name=f"tiny-{stage}", stage=stage, uid=f"job-{stage}", complete=True, succeeded=1, result=result
    )


def test_the_status_and_rlhfctl_status_say_where_the_result_went() -> None:
    view = RunView("tiny", "ns", "uid-1", 1, spec(), None, {})
    jobs = {s: done(s) for s in ("sft", "reward", "ppo", "merge")}
    before = plan(view, Observed(jobs, True), NOW).status
    assert before.phase == "Running" and before.published == []
    jobs["publish"] = done("publish", URIS)
    status = plan(RunView("tiny", "ns", "uid-1", 1, spec(), before, {}), Observed(jobs, True), NOW).status
    assert status.phase == "Succeeded" and status.published == URIS
    assert next(s for s in status.stages if s.name == "publish").published == URIS
    succeeded = next(c for c in status.conditions if c.type == "Succeeded")
    assert URIS[0] in succeeded.message
    text = render_status("tiny", {"spec": {}, "status": status.to_wire()})
    assert f"published: {URIS[0]}" in text and f"published: {URIS[1]}" in text
