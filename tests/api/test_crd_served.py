"""The CRD as served by the real API server: explain, printer columns, status subresource."""

from __future__ import annotations

import json

import pytest

from .builders import minimal_run

pytestmark = pytest.mark.controlplane


def _create(control_plane, namespace, name="run"):
    doc = minimal_run(name)
    control_plane.kubectl("-n", namespace, "create", "-f", "-", input=json.dumps(doc))
    return doc


def test_explain_documents_the_ppo_knobs(control_plane):
    text = control_plane.kubectl("explain", "rlhfrun.spec.ppo")
    assert "miniBatchSize" in text
    assert "must divide batchSize" in text
    assert "Initial coefficient of the per-token KL penalty" in text


def test_explain_documents_nested_fields(control_plane):
    text = control_plane.kubectl("explain", "rlhfrun.spec.sft.quantization.mode")
    assert "4bit" in text


def test_printer_columns_show_status(control_plane, namespace):
    _create(control_plane, namespace)
    status = {"status": {"phase": "Running", "currentStage": "ppo", "progress": "2/4 ppo 40%", "reward": 1.25}}
    control_plane.kubectl(
        "-n", namespace, "patch", "rlhfrun", "run", "--subresource=status", "--type=merge", "-p", json.dumps(status)
    )
    table = control_plane.kubectl("-n", namespace, "get", "rlhfrun", "run").splitlines()
    header, row = table[0].split(), table[1].split()
    assert header[:6] == ["NAME", "METHOD", "PHASE", "STAGE", "PROGRESS", "REWARD"]
    assert row[:4] == ["run", "PPO", "Running", "ppo"]
    assert "2/4 ppo 40%" in table[1] and "1.25" in table[1]


def test_short_name_and_category(control_plane, namespace):
    _create(control_plane, namespace)
    assert "run" in control_plane.kubectl("-n", namespace, "get", "rlhf")
    assert "run" in control_plane.kubectl("-n", namespace, "get", "rlhf,ml")


def test_writing_spec_does_not_touch_status(control_plane, namespace):
    _create(control_plane, namespace)
    control_plane.kubectl(
        "-n",
        namespace,
        "patch",
        "rlhfrun",
        "run",
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"phase": "Running", "currentStage": "sft"}}),
    )
    # A spec write that also carries a status must change the spec and leave the status alone.
    control_plane.kubectl(
        "-n",
        namespace,
        "patch",
        "rlhfrun",
        "run",
        "--type=merge",
        "-p",
        json.dumps({"spec": {"suspend": True}, "status": {"phase": "Failed"}}),
    )
    obj = json.loads(control_plane.kubectl("-n", namespace, "get", "rlhfrun", "run", "-o", "json"))
    assert obj["spec"]["suspend"] is True
    assert obj["status"]["phase"] == "Running"
    assert obj["status"]["currentStage"] == "sft"


def test_status_on_create_is_dropped(control_plane, namespace):
    doc = minimal_run("with-status")
    doc["status"] = {"phase": "Succeeded"}
    control_plane.kubectl("-n", namespace, "create", "-f", "-", input=json.dumps(doc))
    obj = json.loads(control_plane.kubectl("-n", namespace, "get", "rlhfrun", "with-status", "-o", "json"))
    assert "status" not in obj or obj["status"].get("phase") != "Succeeded"


def test_server_applies_schema_defaults(control_plane, namespace):
    _create(control_plane, namespace)
    obj = json.loads(control_plane.kubectl("-n", namespace, "get", "rlhfrun", "run", "-o", "json"))
    assert obj["spec"]["method"] == "PPO"
    assert obj["spec"]["ppo"]["miniBatchSize"] == 16
    assert obj["spec"]["sft"]["dataset"]["split"] == "train"
