"""A stage's process leaves out bitsandbytes and wandb when its spec never uses them
(rlhf_stages.runtime.libraries): what decides it, and that peft and TRL still import without them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import stage_env, tiny_spec, write_invocation
from rlhf_api.layout import StageInvocation
from rlhf_stages.runtime.libraries import unused


def invocation(tmp_path: Path, **sections: object) -> StageInvocation:
    return StageInvocation.model_validate(
        {"stage": "sft", "run": {"name": "r"}, "workspace": str(tmp_path), "spec": tiny_spec(**sections)}
    )


def test_only_what_the_spec_uses_stays(tmp_path: Path) -> None:
    assert unused(invocation(tmp_path)) == ["bitsandbytes", "wandb"]
    qlora = {"sft": {"lora": {"enabled": True}, "quantization": {"mode": "4bit"}}}
    assert unused(invocation(tmp_path, **qlora)) == ["wandb"]
    assert unused(invocation(tmp_path, wandb={"project": "p", "mode": "offline"})) == ["bitsandbytes"]
    # A hub model may be saved quantized, and it cannot be looked at before it is downloaded.
    assert unused(invocation(tmp_path, baseModel={"name": "facebook/opt-125m", "path": None})) == ["wandb"]
    # A model on the volume saved quantized needs bitsandbytes to load, whatever the spec says.
    saved = tmp_path / "assets" / "base-model"
    saved.mkdir(parents=True)
    (saved / "config.json").write_text(json.dumps({"quantization_config": {"load_in_4bit": True}}))
    assert unused(invocation(tmp_path)) == ["wandb"]


def test_peft_and_trl_import_with_them_left_out(workspace: Path) -> None:
    config = write_invocation(workspace, "sft", "libs", tiny_spec())
    probe = (
        "import sys\n"
        "from rlhf_stages.runtime.libraries import leave_out_unused\n"
        f"print(leave_out_unused(['sft', '--config', {str(config)!r}]))\n"
        "import peft, trl.trainer.sft_trainer\n"
        "from transformers.utils import is_bitsandbytes_available\n"
        "loaded = [n for n in ('bitsandbytes', 'wandb') if sys.modules.get(n) is not None]\n"
        "print(loaded, is_bitsandbytes_available())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        env=stage_env(workspace / "unused.json"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()  # the libraries may print notices of their own between the two
    assert (lines[0], lines[-1]) == ("['bitsandbytes', 'wandb']", "[] False"), proc.stdout
