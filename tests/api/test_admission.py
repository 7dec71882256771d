"""Admission against the real kube-apiserver: every example is accepted, every invalid spec is
refused with a message naming the field, and the offline validator agrees with the server."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from rlhf_api import RLHFRunSpec
from rlhf_api.judging import DEFAULT_JUDGE_TEMPLATE
from rlhf_api.validation import validate_manifest

from .builders import EXAMPLES, kubectl_create, minimal_run, patched

pytestmark = pytest.mark.controlplane

# A valid RLAIF spec (then PPO): its reward stage trains on the labelled pairs, so it has no dataset.
RLAIF_SPEC: dict[str, Any] = {
    "method": "RLAIF",
    "baseModel": {"name": "facebook/opt-350m"},
    "sft": {"dataset": {"name": "Open-Orca/OpenOrca"}},
    "rlaif": {"judge": {"name": "a/judge"}, "constitution": ["Be kind."], "dataset": {"name": "a/prompts"}},
    "reward": {},
    "ppo": {"dataset": {"name": "a/prompts"}},
}

# A valid GRPO spec; RLOO and ReST cases reuse its grpo section under their own name.
GRPO_SPEC: dict[str, Any] = {
    "method": "GRPO",
    "baseModel": {"name": "facebook/opt-350m"},
    "sft": {"dataset": {"name": "Open-Orca/OpenOrca"}},
    "reward": {"dataset": {"name": "Anthropic/hh-rlhf"}},
    "grpo": {"dataset": {"name": "a/prompts"}},
}

# A valid S3 target for spec.publish.
PUBLISH_S3: dict[str, Any] = {"bucket": "models", "credentials": {"secretName": "s3-keys"}}

# (case id, dotted path to change, new value, the field the error must name)
INVALID: list[tuple[str, str, Any, str]] = [
    ("unknown method", "spec.method", "A2C", "method"),
    ("no base model", "spec.baseModel", None, "baseModel"),
    ("base model neither name nor path", "spec.baseModel", {}, "baseModel"),
    ("base model both name and path", "spec.baseModel", {"name": "a/b", "path": "m"}, "baseModel"),
    ("absolute model path", "spec.baseModel", {"path": "/models/opt"}, "baseModel.path"),
    ("model path escapes the volume", "spec.baseModel", {"path": "models/../../etc"}, "baseModel.path"),
    ("hub id with spaces", "spec.baseModel", {"name": "my model"}, "baseModel.name"),
    ("PPO without an sft section", "spec.sft", None, "method"),
    ("DPO without a dpo section", "spec.method", "DPO", "method"),
    ("unknown dataset format", "spec.sft.dataset.format", "csv", "format"),
    ("jsonl dataset given a hub name", "spec.sft.dataset.format", "jsonl", "format"),
    ("deeplake name that is not a URL", "spec.sft.dataset.format", "deeplake", "name"),
    ("huggingface name that is a URL", "spec.sft.dataset.name", "s3://bucket/data", "name"),
    ("eval fraction above 1", "spec.sft.dataset.evalFraction", 1.5, "evalFraction"),
    ("zero max samples", "spec.sft.dataset.maxSamples", 0, "maxSamples"),
    ("LoRA rank zero", "spec.sft.lora", {"r": 0}, "r"),
    ("LoRA dropout 1", "spec.sft.lora", {"dropout": 1.0}, "dropout"),
    ("LoRA bias unknown", "spec.sft.lora", {"bias": "some"}, "bias"),
    ("2-bit quantization", "spec.sft.quantization", {"mode": "2bit"}, "mode"),
    (
        "quantization without LoRA",
        "spec.sft",
        {"dataset": {"name": "a/b"}, "lora": {"enabled": False}, "quantization": {"mode": "4bit"}},
        "quantization",
    ),
    ("zero learning rate", "spec.sft.training", {"learningRate": 0}, "learningRate"),
    ("bf16 and fp16 together", "spec.sft.training", {"bf16": True, "fp16": True}, "fp16"),
    ("unknown scheduler", "spec.sft.training", {"lrSchedulerType": "exp"}, "lrSchedulerType"),
    ("template without response", "spec.sft.promptTemplate", "Q: {question}", "promptTemplate"),
    ("misspelled SFT field", "spec.sft.learningRate", 0.1, "learningRate"),
    ("mini-batch does not divide batch", "spec.ppo.miniBatchSize", 48, "miniBatchSize"),
    ("mini-batch above batch", "spec.ppo.miniBatchSize", 128, "miniBatchSize"),
    ("min response longer than max", "spec.ppo.responseLength", {"min": 64, "max": 16}, "min"),
    ("negative KL coefficient", "spec.ppo.initKlCoef", -1, "initKlCoef"),
    ("zero KL target", "spec.ppo.klTarget", 0, "klTarget"),
    ("zero clip range", "spec.ppo.clipRange", 0, "clipRange"),
    ("gamma above 1", "spec.ppo.gamma", 1.5, "gamma"),
    ("top-p zero", "spec.ppo.generation", {"topP": 0}, "topP"),
    ("reward max length too small", "spec.reward.maxLength", 4, "maxLength"),
    ("unknown pull policy", "spec.runtime", {"imagePullPolicy": "Sometimes"}, "imagePullPolicy"),
    ("negative backoff limit", "spec.runtime", {"backoffLimit": -1}, "backoffLimit"),
    ("existing claim with a size", "spec.storage", {"existingClaim": "data", "size": "10Gi"}, "existingClaim"),
    ("unknown access mode", "spec.storage", {"accessModes": ["ReadWriteAll"]}, "accessModes"),
    ("size that is no quantity", "spec.storage", {"size": "lots"}, "size"),
    ("negative GPUs", "spec.sft.resources", {"gpus": -1}, "gpus"),
    ("memory that is no quantity", "spec.ppo.resources", {"memory": "16 GB"}, "memory"),
    ("secret ref without key", "spec.secrets", {"hfToken": {"name": "hf"}}, "key"),
    ("activeloop secret ref without key", "spec.secrets", {"activeloopToken": {"name": "al"}}, "key"),
    ("online W&B without a key", "spec.wandb", {"project": "p"}, "wandb"),
    ("W&B without project", "spec.wandb", {"mode": "offline"}, "project"),
    ("run name too long", "metadata.name", "r" * 41, "metadata.name"),
    ("publish without a target", "spec.publish", {}, "publish"),
    ("publish to the hub without a token", "spec.publish", {"hub": {"repoId": "acme/tiny"}}, "publish.hub.token"),
    ("publish to S3 without credentials", "spec.publish", {"s3": {"bucket": "models"}}, "credentials"),
    ("publish bucket S3 does not allow", "spec.publish", {"s3": {**PUBLISH_S3, "bucket": "My_Models"}}, "bucket"),
    ("publish prefix with ..", "spec.publish", {"s3": {**PUBLISH_S3, "prefix": "a/../b"}}, "prefix"),
    ("publish endpoint without scheme", "spec.publish", {"s3": {**PUBLISH_S3, "endpoint": "s3.local"}}, "endpoint"),
    (
        "publish a reward model DPO does not train",
        "spec",
        {
            "method": "DPO",
            "baseModel": {"name": "facebook/opt-350m"},
            "sft": {"dataset": {"name": "a/b"}},
            "dpo": {"dataset": {"name": "a/pairs"}},
            "publish": {"s3": PUBLISH_S3, "rewardModel": True},
        },
        "publish.rewardModel",
    ),
    (
        "publish with merge disabled",
        "spec",
        {**minimal_run()["spec"], "merge": {"enabled": False}, "publish": {"s3": PUBLISH_S3}},
        "publish",
    ),
    ("suspend is not a boolean", "spec.suspend", "yes", "suspend"),
    (
        "DPO exo_pair without label smoothing",
        "spec.dpo",
        {"dataset": {"name": "a/b"}, "lossType": "exo_pair"},
        "labelSmoothing",
    ),
    (
        "DPO label smoothing with hinge loss",
        "spec.dpo",
        {"dataset": {"name": "a/b"}, "lossType": "hinge", "labelSmoothing": 0.1},
        "labelSmoothing",
    ),
    ("DPO label smoothing 0.5", "spec.dpo", {"dataset": {"name": "a/b"}, "labelSmoothing": 0.5}, "labelSmoothing"),
    ("ReST thresholds that fall", "spec.rest", {"dataset": {"name": "a/b"}, "thresholds": [0.7, 0.5]}, "thresholds"),
    ("ReST threshold of 1", "spec.rest", {"dataset": {"name": "a/b"}, "thresholds": [0.5, 1.0]}, "thresholds"),
    ("ReST watch rollback", "spec.rest", {"dataset": {"name": "a/b"}, "watch": {"action": "rollback"}}, "watch.action"),
    (
        "GRPO watch rollback without a KL penalty",
        "spec",
        patched(GRPO_SPEC, "grpo", {"dataset": {"name": "a/b"}, "beta": 0.0, "watch": {"action": "rollback"}}),
        "grpo.watch.action",
    ),
    ("watch check without a condition", "spec.ppo.watch", {"checks": [{"name": "empty"}]}, "checks[0]"),
    (
        "watch check minChars above maxChars",
        "spec.ppo.watch",
        {"checks": [{"name": "len", "minChars": 9, "maxChars": 3}]},
        "minChars",
    ),
    (
        "watch checks sharing a name",
        "spec.ppo.watch",
        {"checks": [{"name": "a", "maxChars": 9}, {"name": "a", "maxTokens": 3}]},
        "watch.checks",
    ),
    ("watch check name with capitals", "spec.ppo.watch", {"checks": [{"name": "NoLinks", "maxChars": 9}]}, "name"),
    (
        "watch judge template without {b}",
        "spec.ppo.watch",
        {"judge": {"model": {"path": "j"}, "constitution": ["Be kind."], "template": "{constitution} {prompt} {a}"}},
        "template",
    ),
    ("watch judge without a constitution", "spec.ppo.watch", {"judge": {"model": {"path": "j"}}}, "constitution"),
    ("DPO unknown loss type", "spec.dpo", {"dataset": {"name": "a/b"}, "lossType": "kto"}, "lossType"),
    ("reward stage without a dataset", "spec.reward", {"maxLength": 256}, "reward.dataset"),
    (
        "RLAIF reward stage given a dataset",
        "spec",
        patched(RLAIF_SPEC, "reward", {"dataset": {"name": "a/b"}}),
        "reward.dataset",
    ),
    ("RLAIF without a judge", "spec", patched(RLAIF_SPEC, "rlaif.judge"), "judge"),
    (
        "RLAIF judge template without {b}",
        "spec",
        patched(RLAIF_SPEC, "rlaif.judgeTemplate", "{constitution} {prompt} A:{a} Better:"),
        "judgeTemplate",
    ),
    ("RLAIF zero pairs per prompt", "spec", patched(RLAIF_SPEC, "rlaif.pairsPerPrompt", 0), "pairsPerPrompt"),
    # A policy stage scores with a reward model: an enabled reward stage or its own rewardModel.
    ("PPO with neither a reward stage nor a rewardModel", "spec.reward", {"enabled": False}, "ppo.rewardModel"),
    (
        "GRPO with neither a reward stage nor a rewardModel",
        "spec",
        {**GRPO_SPEC, "reward": {"enabled": False}},
        "grpo.rewardModel",
    ),
    (
        "RLOO with neither a reward stage nor a rewardModel",
        "spec",
        {**GRPO_SPEC, "method": "RLOO", "rloo": GRPO_SPEC["grpo"], "grpo": None, "reward": {"enabled": False}},
        "rloo.rewardModel",
    ),
    (
        "ReST with neither a reward stage nor a rewardModel",
        "spec",
        {**GRPO_SPEC, "method": "ReST", "rest": GRPO_SPEC["grpo"], "grpo": None, "reward": {"enabled": False}},
        "rest.rewardModel",
    ),
    (
        "RLAIF then PPO with its reward stage off",
        "spec",
        patched(RLAIF_SPEC, "reward", {"enabled": False}),
        "ppo.rewardModel",
    ),
    # The Pod-template overlay (spec.podTemplate, spec.<stage>.podTemplate): typed, and never the
    # operator's own names. Each refusal names the field.
    *(
        (f"podTemplate env {name}", "spec.podTemplate", {"env": [{"name": name, "value": "x"}]}, "podTemplate.env")
        for name in ("HOME", "HF_HOME", "HF_TOKEN", "ACTIVELOOP_TOKEN", "RLHF_STAGE", "WANDB_API_KEY")
    ),
    (
        "a stage's podTemplate env WANDB_MODE",
        "spec.ppo.podTemplate",
        {"env": [{"name": "WANDB_MODE"}]},
        "ppo.podTemplate.env",
    ),
    ("podTemplate env twice", "spec.podTemplate", {"env": [{"name": "A"}, {"name": "A", "value": "2"}]}, "env"),
    ("podTemplate env name with =", "spec.podTemplate", {"env": [{"name": "A=B"}]}, "env[0].name"),
    (
        "podTemplate env with value and valueFrom",
        "spec.podTemplate",
        {"env": [{"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]},
        "env[0].valueFrom",
    ),
    ("podTemplate env valueFrom empty", "spec.podTemplate", {"env": [{"name": "A", "valueFrom": {}}]}, "secretKeyRef"),
    (
        "podTemplate env from a Pod field the downward API lacks",
        "spec.podTemplate",
        {"env": [{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "spec.containers"}}}]},
        "fieldPath",
    ),
    (
        "podTemplate envFrom Secret and ConfigMap at once",
        "spec.podTemplate",
        {"envFrom": [{"secretRef": {"name": "s"}, "configMapRef": {"name": "c"}}]},
        "envFrom[0].secretRef",
    ),
    (
        "podTemplate envFrom prefix RLHF_",
        "spec.podTemplate",
        {"envFrom": [{"prefix": "RLHF_", "configMapRef": {"name": "c"}}]},
        "envFrom[0].prefix",
    ),
    *(
        (
            f"podTemplate volume named {name}",
            "spec.podTemplate",
            {"volumes": [{"name": name, "emptyDir": {}}]},
            "volumes",
        )
        for name in ("workspace", "config", "tmp", "dshm", "constitution")
    ),
    (
        "podTemplate hostPath volume",
        "spec.podTemplate",
        {"volumes": [{"name": "h", "hostPath": {"path": "/"}}]},
        "hostPath",
    ),
    ("podTemplate volume without a source", "spec.podTemplate", {"volumes": [{"name": "v"}]}, "volumes[0]"),
    (
        "podTemplate volume with two sources",
        "spec.podTemplate",
        {"volumes": [{"name": "v", "emptyDir": {}, "configMap": {"name": "c"}}]},
        "volumes[0]",
    ),
    (
        "podTemplate volume twice",
        "spec.podTemplate",
        {"volumes": [{"name": "v", "emptyDir": {}}, {"name": "v", "emptyDir": {}}]},
        "volumes",
    ),
    (
        "podTemplate ConfigMap item escaping the mount",
        "spec.podTemplate",
        {"volumes": [{"name": "v", "configMap": {"name": "c", "items": [{"key": "k", "path": "../k"}]}}]},
        "items[0].path",
    ),
    *(
        (
            f"podTemplate mount at {path}",
            "spec.podTemplate",
            {"volumes": [{"name": "v", "emptyDir": {}}], "volumeMounts": [{"name": "v", "mountPath": path}]},
            "volumeMounts",
        )
        for path in ("/workspace", "/workspace/models", "/tmp", "/dev/shm", "/etc/rlhf", "/etc", "/dev")
    ),
    (
        "podTemplate relative mount path",
        "spec.podTemplate",
        {"volumes": [{"name": "v", "emptyDir": {}}], "volumeMounts": [{"name": "v", "mountPath": "data"}]},
        "mountPath",
    ),
    (
        "podTemplate mount path with ..",
        "spec.podTemplate",
        {"volumes": [{"name": "v", "emptyDir": {}}], "volumeMounts": [{"name": "v", "mountPath": "/data/../tmp"}]},
        "mountPath",
    ),
    (
        "podTemplate mount path twice",
        "spec.podTemplate",
        {
            "volumes": [{"name": "v", "emptyDir": {}}],
            "volumeMounts": [{"name": "v", "mountPath": "/d"}, {"name": "v", "mountPath": "/d", "readOnly": True}],
        },
        "volumeMounts",
    ),
    (
        "podTemplate mount of no volume",
        "spec.podTemplate",
        {"volumeMounts": [{"name": "v", "mountPath": "/data"}]},
        "podTemplate.volumeMounts",
    ),
    (
        "a stage's mount of no volume",
        "spec.sft.podTemplate",
        {"volumeMounts": [{"name": "v", "mountPath": "/data"}]},
        "sft.podTemplate.volumeMounts",
    ),
    *(
        (f"podTemplate label {key}", "spec.podTemplate", {"labels": {key: "x"}}, "podTemplate.labels")
        for key in (
            "rlhf-operator.io/run",
            "team.rlhf-operator.io/x",
            "kueue.x-k8s.io/queue-name",
            "kueue.x-k8s.io/priority-class",
            "app.kubernetes.io/managed-by",
            "not a key",
        )
    ),
    (
        "podTemplate annotation rlhf-operator.io/retry",
        "spec.podTemplate",
        {"annotations": {"rlhf-operator.io/retry": "1"}},
        "annotations",
    ),
    ("podTemplate label value with spaces", "spec.podTemplate", {"labels": {"team": "a b"}}, "labels.team"),
    # Multi-node stages: which stages may span Pods and shard with FSDP is the method table's (StageKind).
    ("17 nodes", "spec.sft.resources", {"nodes": 17}, "nodes"),
    ("zero nodes", "spec.sft.resources", {"nodes": 0}, "nodes"),
    ("merge on two Pods", "spec.merge", {"resources": {"nodes": 2}}, "merge.resources.nodes"),
    ("inputs on two Pods", "spec.inputs", {"resources": {"nodes": 2}}, "inputs.resources.nodes"),
    ("unknown sharding", "spec.sft.resources", {"sharding": "ZeRO"}, "sharding"),
    ("FSDP without GPUs", "spec.sft.resources", {"gpus": 0, "sharding": "FSDP"}, "sharding"),
    ("FSDP on ppo", "spec.ppo.resources", {"sharding": "FSDP"}, "ppo.resources.sharding"),
    (
        "FSDP with QLoRA",
        "spec.reward",
        {"dataset": {"name": "a/b"}, "quantization": {"mode": "4bit"}, "resources": {"sharding": "FSDP"}},
        "reward.resources.sharding",
    ),
    (
        "ReST on two Pods",
        "spec",
        {**GRPO_SPEC, "method": "ReST", "rest": {**GRPO_SPEC["grpo"], "resources": {"nodes": 2}}, "grpo": None},
        "rest.resources.nodes",
    ),
    (
        "two Pods on a ReadWriteOncePod workspace",
        "spec",
        {
            **minimal_run()["spec"],
            "sft": {"dataset": {"name": "a/b"}, "resources": {"nodes": 2}},
            "storage": {"accessModes": ["ReadWriteOncePod"]},
        },
        "storage.accessModes",
    ),
    ("podTemplate schedulerName not a name", "spec.podTemplate", {"schedulerName": "My_Scheduler"}, "schedulerName"),
    ("podTemplate shm size not a quantity", "spec.podTemplate", {"shmSizeLimit": "lots"}, "shmSizeLimit"),
    ("a stage's tmp size not a quantity", "spec.merge.podTemplate", {"tmpSizeLimit": "lots"}, "tmpSizeLimit"),
]

# A Pod overlay platform teams would write: admitted, and what the server stores parses to the same spec.
POD_TEMPLATE: dict[str, Any] = {
    "labels": {"team": "nlp", "example.com/cost-center": "ml-42"},
    "annotations": {"example.com/log-format": "json lines"},
    "env": [
        {"name": "TEAM", "value": "nlp"},
        {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password", "optional": True}}},
        {"name": "REGION", "valueFrom": {"configMapKeyRef": {"name": "site", "key": "region"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "TEAM_LABEL", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['team']"}}},
    ],
    "envFrom": [{"prefix": "SITE_", "configMapRef": {"name": "site"}}, {"secretRef": {"name": "s3-creds"}}],
    "volumes": [
        {"name": "datasets", "persistentVolumeClaim": {"claimName": "shared-datasets", "readOnly": True}},
        {"name": "site", "configMap": {"name": "site", "items": [{"key": "ca.crt", "path": "certs/ca.crt"}]}},
        {"name": "creds", "secret": {"secretName": "s3-creds", "optional": True}},
        {"name": "scratch", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
    ],
    "volumeMounts": [
        {"name": "datasets", "mountPath": "/data", "readOnly": True},
        {"name": "site", "mountPath": "/etc/site", "subPath": "certs"},
        {"name": "scratch", "mountPath": "/scratch"},
    ],
    "schedulerName": "volcano",
    "runtimeClassName": "nvidia",
    "shmSizeLimit": "8Gi",
    "tmpSizeLimit": "20Gi",
}

# Specs whose policy stage has a reward model from somewhere (or needs none): all admitted.
REWARD_SOURCES: dict[str, dict[str, Any]] = {
    "PPO with its own rewardModel": {
        **minimal_run()["spec"],
        "reward": {"enabled": False},
        "ppo": {
            "dataset": {"name": "a/prompts"},
            "rewardModel": {"name": "OpenAssistant/reward-model-deberta-v3-large"},
        },
    },
    "GRPO with a reward model on the volume": {
        **GRPO_SPEC,
        "reward": {"enabled": False},
        "grpo": {**GRPO_SPEC["grpo"], "rewardModel": {"path": "models/rm"}},
    },
    "PPO whose ppo stage is off too": {
        **minimal_run()["spec"],
        "reward": {"enabled": False},
        "ppo": {"enabled": False},
    },
    "PPO published to S3 and the hub, reward model too": {
        **minimal_run()["spec"],
        "secrets": {"hfToken": {"name": "hf", "key": "token"}},
        "publish": {
            "s3": {**PUBLISH_S3, "prefix": "a/b", "endpoint": "http://s3.local:8333"},
            "hub": {"repoId": "a/b"},
            "rewardModel": True,
        },
    },
    "DPO, which has no reward model": {
        "method": "DPO",
        "baseModel": {"name": "facebook/opt-350m"},
        "sft": {"dataset": {"name": "a/b"}},
        "dpo": {"dataset": {"name": "a/pairs"}},
    },
    "RLAIF then DPO": {
        **{k: v for k, v in RLAIF_SPEC.items() if k not in ("reward", "ppo")},
        "rlaif": {**RLAIF_SPEC["rlaif"], "then": "DPO"},
        "dpo": {},
    },
}


def _case(path: str, value: Any) -> dict[str, Any]:
    doc = minimal_run("invalid")
    if path == "spec":
        return {**doc, "spec": {k: v for k, v in value.items() if v is not None}}
    if path == "spec.method" and value == "DPO":
        return patched(doc, path, value)
    return patched(doc, path) if value is None else patched(doc, path, value)


@pytest.mark.parametrize(("path", "value", "field"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_spec_is_refused_naming_the_field(control_plane, namespace, path, value, field):
    doc = _case(path, value)
    proc = kubectl_create(control_plane, namespace, doc)
    assert proc.returncode != 0, f"server accepted: {proc.stdout}"
    assert field in proc.stderr, proc.stderr

    _, errors = validate_manifest(doc)
    assert errors, "offline validation accepted what the server refused"
    assert any(field in line for line in errors), errors


def test_rlaif_spec_without_reward_dataset_is_admitted(control_plane, namespace):
    doc = {**minimal_run("rlaif-ok"), "spec": RLAIF_SPEC}
    doc["metadata"]["namespace"] = namespace
    control_plane.kubectl("create", "-f", "-", input=json.dumps(doc))
    model, errors = validate_manifest(doc)
    assert errors == [] and model is not None
    assert model.spec.pipeline() == ("inputs", "sft", "rlaif", "reward", "ppo", "merge")


def test_grpo_and_rloo_rollback_with_a_kl_penalty_are_admitted(control_plane, namespace):
    watch = {"action": "rollback", "checks": [{"name": "no-links", "mustNotMatch": "https?://"}]}
    for method, beta in (("GRPO", None), ("RLOO", 0.1)):  # None: the default beta (0.04)
        section = {"dataset": {"name": "a/prompts"}, "watch": watch} | ({"beta": beta} if beta else {})
        spec = {**{k: v for k, v in GRPO_SPEC.items() if k != "grpo"}, "method": method, method.lower(): section}
        doc = {**minimal_run(f"{method.lower()}-rollback"), "spec": spec}
        doc["metadata"]["namespace"] = namespace
        control_plane.kubectl("create", "-f", "-", input=json.dumps(doc))
        assert validate_manifest(doc)[1] == []


def test_a_watch_judge_is_admitted_and_its_model_is_an_input(control_plane, namespace):
    judge = {"model": {"name": "a/judge"}, "dtype": "float32", "constitution": ["Be kind.", "Be brief."]}
    doc = patched(minimal_run("judge-ok"), "spec.ppo.watch", {"judge": judge, "judgeDrop": 0.2})
    doc["metadata"]["namespace"] = namespace
    control_plane.kubectl("create", "-f", "-", input=json.dumps(doc))
    model, errors = validate_manifest(doc)
    assert errors == [] and model is not None and model.spec.ppo.watch.judge.template == DEFAULT_JUDGE_TEMPLATE
    assert ("ppo.watch.judge.model", model.spec.ppo.watch.judge.model) in model.spec.input_sources()  # staged


@pytest.mark.parametrize("spec", list(REWARD_SOURCES.values()), ids=list(REWARD_SOURCES))
def test_policy_stages_with_a_reward_model_are_admitted(control_plane, namespace, spec):
    doc = {**minimal_run("rm-ok"), "spec": spec}
    doc["metadata"]["namespace"] = namespace
    control_plane.kubectl("create", "-f", "-", input=json.dumps(doc))
    model, errors = validate_manifest(doc)
    assert errors == [] and model is not None


# Multi-node stages as the method table allows them (StageKind.multi_node, StageKind.shardings).
MULTI_NODE_SPEC: dict[str, Any] = {
    **minimal_run()["spec"],
    "sft": {"dataset": {"name": "a/b"}, "resources": {"nodes": 4, "gpus": 8, "sharding": "FSDP"}},
    "reward": {"dataset": {"name": "a/pairs"}, "resources": {"nodes": 2, "sharding": "FSDP"}},
    "ppo": {"dataset": {"name": "a/prompts"}, "resources": {"nodes": 16, "gpus": 0}},
    "storage": {"accessModes": ["ReadWriteMany"]},
}


def test_multi_node_stages_are_admitted(control_plane, namespace):
    doc = {**minimal_run("multi-node"), "spec": MULTI_NODE_SPEC}
    doc["metadata"]["namespace"] = namespace
    control_plane.kubectl("create", "-f", "-", input=json.dumps(doc))
    stored = json.loads(control_plane.kubectl("get", "rlhfrun", "multi-node", "-n", namespace, "-o", "json"))
    model, errors = validate_manifest(doc)
    assert errors == [] and model is not None
    # The server's defaults agree with the models' (sharding DDP on ppo, nodes 1 on the others).
    assert RLHFRunSpec.model_validate(stored["spec"]) == model.spec
    assert stored["spec"]["ppo"]["resources"]["sharding"] == "DDP"
    assert (model.spec.sft.resources.nodes, model.spec.merge.resources.nodes) == (4, 1)


def test_pod_template_overlays_are_admitted(control_plane, namespace):
    doc = patched(minimal_run("overlay"), "spec.podTemplate", POD_TEMPLATE)
    # A stage's overlay may mount a volume of spec.podTemplate, and add its own.
    stage = {"volumes": [{"name": "extra", "emptyDir": {}}], "volumeMounts": [{"name": "creds", "mountPath": "/creds"}]}
    doc = patched(
        doc, "spec.ppo.podTemplate", {**stage, "env": [{"name": "TEAM", "value": "rl"}], "shmSizeLimit": "16Gi"}
    )
    doc["metadata"]["namespace"] = namespace
    control_plane.kubectl("create", "-f", "-", input=json.dumps(doc))
    stored = json.loads(control_plane.kubectl("get", "rlhfrun", "overlay", "-n", namespace, "-o", "json"))
    model, errors = validate_manifest(doc)
    assert errors == [] and model is not None
    assert RLHFRunSpec.model_validate(stored["spec"]) == model.spec
    assert stored["spec"]["podTemplate"]["volumeMounts"][1]["subPath"] == "certs"


def test_table_is_large_enough():
    assert len(INVALID) >= 30


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_are_accepted(control_plane, namespace, example):
    doc = yaml.safe_load(example.read_text())
    doc["metadata"]["namespace"] = namespace
    text = json.dumps(doc)
    dry = control_plane.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-", input=text)
    assert "serverside-applied (server dry run)" in dry
    control_plane.kubectl("create", "-f", "-", input=text)
    stored = json.loads(control_plane.kubectl("get", "rlhfrun", doc["metadata"]["name"], "-n", namespace, "-o", "json"))
    model, errors = validate_manifest(doc)
    assert model is not None, errors
    # The server's schema defaults and the models' defaults must agree: parsing what the server
    # stored gives the same spec as parsing what was sent.
    assert RLHFRunSpec.model_validate(stored["spec"]) == model.spec
