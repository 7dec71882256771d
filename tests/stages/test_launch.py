"""Where a Pod stands in a multi-node stage, and what it launches: ``runtime/launch.py`` without training.

FSDP: its translation into the Trainer's arguments and its refusals. No GPU here, so FSDP itself
never runs in these tests (docs/stage-protocol.md says what that leaves untested).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from conftest import read_result, run_stage, tiny_spec, write_invocation
from rlhf_stages.runtime import launch
from rlhf_stages.runtime.context import StageConfigError


def _ctx(nodes: int) -> Any:
    return SimpleNamespace(stage="sft", config=SimpleNamespace(resources=SimpleNamespace(nodes=nodes)))


@pytest.fixture
def pod_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A Pod's env with nothing of a gang in it (this test process may run under torchrun's or a Job's)."""
    for name in (launch.JOB_INDEX_ENV, launch.SERVICE_ENV, launch.PORT_ENV, launch.POD_IP_ENV, launch.TIMEOUT_ENV):
        monkeypatch.delenv(name, raising=False)
    for name in ("LOCAL_RANK", launch.CHILD_ENV):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_node_zero_listens_at_its_pod_ip(pod_env: pytest.MonkeyPatch) -> None:
    pod_env.setenv(launch.JOB_INDEX_ENV, "0")
    assert launch.gang(_ctx(2)).master_addr == "127.0.0.1"  # no Pod IP: a local run
    pod_env.setenv(launch.POD_IP_ENV, "10.1.2.3")
    pod_env.setenv(launch.PORT_ENV, "29555")
    gang = launch.gang(_ctx(2))
    assert (gang.node_rank, gang.master_addr, gang.master_port, gang.leader) == (0, "10.1.2.3", 29555, True)
    assert gang.timeout_s == launch.DEFAULT_TIMEOUT_S


def test_other_nodes_reach_node_zero_through_the_service(pod_env: pytest.MonkeyPatch) -> None:
    pod_env.setenv(launch.JOB_INDEX_ENV, "1")
    pod_env.setenv(launch.SERVICE_ENV, "tiny-sft-rdzv")
    pod_env.setenv(launch.POD_IP_ENV, "10.1.2.4")  # its own address: not where node 0 is
    assert launch.gang(_ctx(2)).master_addr == "tiny-sft-rdzv"  # cluster DNS
    pod_env.setenv("TINY_SFT_RDZV_SERVICE_HOST", "10.96.0.17")  # what the kubelet sets
    gang = launch.gang(_ctx(2))
    assert (gang.node_rank, gang.master_addr, gang.master_port, gang.leader) == (1, "10.96.0.17", 29400, False)
    assert launch.gang(_ctx(2), master_addr="127.0.0.1").master_addr == "127.0.0.1"  # --master-addr


@pytest.mark.parametrize(
    ("env", "nodes", "node_rank", "needle"),
    [
        ({}, 2, None, "JOB_COMPLETION_INDEX is not set"),
        ({"JOB_COMPLETION_INDEX": "2"}, 2, None, "outside 0..1"),
        ({}, 3, 1, "RLHF_RENDEZVOUS_SERVICE is not set"),
        ({"JOB_COMPLETION_INDEX": "0", "RLHF_RENDEZVOUS_TIMEOUT_S": "soon"}, 2, None, "not a whole number"),
    ],
)
def test_a_pod_that_cannot_place_itself_is_a_config_error(
    pod_env: pytest.MonkeyPatch, env: dict[str, str], nodes: int, node_rank: int | None, needle: str
) -> None:
    for name, value in env.items():
        pod_env.setenv(name, value)
    with pytest.raises(StageConfigError, match=needle):
        launch.gang(_ctx(nodes), node_rank=node_rank)


def test_torchrun_command(pod_env: pytest.MonkeyPatch) -> None:
    one = launch.torchrun_command("sft", Path("/c.yaml"), 4, launch.gang(_ctx(1)))
    assert "--standalone" in one and "--nproc-per-node=4" in one and not any("--nnodes" in a for a in one)
    gang = launch.Gang(nodes=3, node_rank=2, master_addr="10.96.0.17", master_port=29400, timeout_s=90)
    many = launch.torchrun_command("sft", Path("/c.yaml"), 1, gang)
    for arg in (
        "--nnodes=3",
        "--node-rank=2",
        "--master-addr=10.96.0.17",
        "--master-port=29400",
        "--rdzv-conf=timeout=90",
        "--max-restarts=0",
        "--nproc-per-node=1",
    ):
        assert arg in many
    assert "--standalone" not in many
    assert many[-3:] == ["sft", "--config", "/c.yaml"]


def test_rendezvous_failure_names_the_missing_node() -> None:
    def gang(nodes: int, rank: int) -> launch.Gang:
        return launch.Gang(nodes=nodes, node_rank=rank, master_addr="10.0.0.5", master_port=29400, timeout_s=30)

    assert "missing: node 1 " in launch.rendezvous_failure(gang(2, 0))
    assert "missing: one or more of nodes 1..3" in launch.rendezvous_failure(gang(4, 0))
    assert "missing: node 0" in launch.rendezvous_failure(gang(4, 2)) and "10.0.0.5:29400" in launch.rendezvous_failure(
        gang(4, 2)
    )
    assert "within 30 s (RLHF_RENDEZVOUS_TIMEOUT_S)" in launch.rendezvous_failure(gang(2, 1))


FSDP = {"resources": {"gpus": 1, "memory": "4Gi", "sharding": "FSDP"}}


def test_fsdp_without_gpus_is_refused_at_load(workspace: Path, tmp_path: Path) -> None:
    spec = tiny_spec(sft={"resources": {"gpus": 0, "sharding": "FSDP"}})
    code, out = run_stage("sft", write_invocation(workspace, "sft", "fsdp-cpu", spec), tmp_path / "r.json")
    message = read_result(tmp_path / "r.json")["message"]
    assert code == 2 and "spec.sft.resources" in message and "sharding" in message, out
    assert "set gpus to 1 or more" in message, "the fix is named"


def test_fsdp_translates_into_the_trainers_arguments(
    workspace: Path, in_process: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Full shard (FSDP2, resharded after forward), wrapped by transformer layer, the full state dict
    for saving, gradient checkpointing as FSDP's own: through transformers' own processing of them."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    from rlhf_api.layout import StageInvocation
    from rlhf_stages.runtime import training
    from rlhf_stages.runtime.context import StageContext
    from rlhf_stages.runtime.entrypoint import load_invocation

    spec = tiny_spec(sft=FSDP | {"training": {"gradientCheckpointing": True}})
    invocation: StageInvocation = load_invocation(write_invocation(workspace, "sft", "fsdp-args", spec))
    ctx = StageContext.create(invocation)
    model = AutoModelForCausalLM.from_pretrained(workspace / "assets" / "base-model")
    monkeypatch.setattr(training, "cuda_available", lambda: True)  # as on a GPU Pod
    kwargs = training.fsdp_kwargs(ctx, model, ctx.config.training)
    assert kwargs["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert kwargs[training.checkpointing_field()] is False
    monkeypatch.setattr(training, "cuda_available", lambda: False)  # SFTConfig on this CPU machine
    args = SFTConfig(**(training.trainer_kwargs(ctx, ctx.config.training, has_eval=False) | kwargs))
    plugin = args.fsdp_plugin_args
    assert args.fsdp is True and plugin["fsdp_version"] == 2 and plugin["reshard_after_forward"] is True
    assert plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert plugin["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"
    assert plugin["state_dict_type"] == "FULL_STATE_DICT" and plugin["activation_checkpointing"] is True
    assert getattr(args, training.checkpointing_field()) is False


def test_fsdp_on_a_pod_without_cuda_is_refused_before_training(workspace: Path, in_process: Path) -> None:
    """The Pod asked for a GPU but sees none: exit 2 naming the field, not a quiet fall back to DDP
    (which is what transformers does with ``fsdp`` on the CPU)."""
    from rlhf_stages.runtime.entrypoint import main

    config = write_invocation(workspace, "sft", "fsdp-no-cuda", tiny_spec(sft=FSDP))
    assert main(["sft", "--config", str(config)]) == 2
    result = read_result(in_process)
    assert "spec.sft.resources.sharding" in result["message"] and "no CUDA device" in result["message"], result
    assert result["step"] == 0


def test_fsdp_on_one_process_still_starts_torchrun(
    workspace: Path, in_process: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Trainer shards only inside a torch.distributed process group ("Using fsdp only works in
    distributed training" in a lone process), so a one-GPU FSDP stage is launched like a gang of one."""
    from rlhf_stages.runtime import entrypoint, training

    launched: list[int] = []
    monkeypatch.setattr(training, "cuda_available", lambda: True)  # as on a GPU Pod
    monkeypatch.setattr(launch, "run", lambda stage, config, processes, gang, log: launched.append(processes) or 0)
    config = write_invocation(workspace, "sft", "fsdp-one", tiny_spec(sft=FSDP))
    assert entrypoint.main(["sft", "--config", str(config)]) == 0
    assert launched == [1], "one process, under torchrun"
