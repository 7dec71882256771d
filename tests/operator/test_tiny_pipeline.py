"""The real thing: examples/tiny.yaml through the real API server, the operator, and the real stages.

Slow (trains four tiny models on the CPU), so marked ``training``.
"""

from __future__ import annotations

import json
import shutil

import pytest

from .harness import Env, tiny_run

# Four CPU trainings on a shared 2-core machine can outlast the suite's default 900 s timeout.
pytestmark = [pytest.mark.controlplane, pytest.mark.training, pytest.mark.timeout(2700)]


@pytest.fixture
def assets(env: Env) -> None:
    from rlhf_stages.tiny.assets import build_tiny_assets

    build_tiny_assets(env.volume / "assets")


def shortened(manifest: dict) -> dict:
    """The tiny example with its training cut short: this test is about orchestration with the real
    stages (learning is asserted by tests/cli/test_quickstart.py and the stage tests). Its SFT stage is
    a gang of two Pods (resources.nodes 2), which the dev Job controller runs as two local processes
    meeting on this machine, as `rlhfctl dev` runs a multi-node spec."""
    spec = manifest["spec"]
    spec["sft"]["resources"]["nodes"] = 2
    spec["sft"]["training"]["maxSteps"] = 30
    spec["reward"]["training"]["maxSteps"] = 30
    spec["ppo"].update(totalSteps=4, saveFreq=2)
    return manifest


def test_tiny_example_runs_to_succeeded(env: Env, assets: None) -> None:
    env.start_kubelet(fake=False)
    env.start_operator()
    env.apply(shortened(tiny_run()))
    run = env.wait_phase("tiny", "Succeeded", timeout=1500)
    status = run["status"]
    assert status["outputModel"] == f"runs/{env.namespace}/tiny/merge/model"
    model = env.volume / status["outputModel"]
    assert (model / "config.json").exists(), sorted(p.name for p in model.iterdir())
    for stage in status["stages"]:
        assert stage["phase"] == "Succeeded" and stage["metrics"], stage
    assert status["reward"] is not None
    assert status["progress"] == "4/4"
    # The gang: one Pod per index, both ran to completion, one rendezvous (node 1 joined node 0's).
    pods = env.items("pods", "rlhf-operator.io/stage=sft")
    indexes = sorted(p["metadata"]["labels"].get("batch.kubernetes.io/job-completion-index") for p in pods)
    assert indexes == ["0", "1"], [p["metadata"]["name"] for p in pods]
    assert all(p["status"]["phase"] == "Succeeded" for p in pods), [p["status"]["phase"] for p in pods]
    node_1 = next(p for p in pods if p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] == "1")
    log = (env.root / "pods" / env.namespace / node_1["metadata"]["name"] / "container.log").read_text()
    assert "as node 1 of 2" in log and "--master-addr=127.0.0.1" in log, log[-2000:]


def test_corrupt_model_exhausts_retries(env: Env, assets: None) -> None:
    """A real, retryable failure: the base model's weights are garbage (exit 1, retried, then Failed)."""
    base = env.volume / "assets" / "base-model"
    for weights in base.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}) + "garbage")
    env.start_kubelet(fake=False)
    env.start_operator()
    env.apply(tiny_run())  # runtime.backoffLimit: 1
    run = env.wait_phase("tiny", "Failed", timeout=600)
    failed = next(c for c in run["status"]["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and "stage sft" in failed["message"], failed
    assert failed["reason"] in ("BackoffLimitExceeded", "ConfigError", "InputMissing"), failed
    shutil.rmtree(base)
