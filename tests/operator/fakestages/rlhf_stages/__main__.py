"""``python -m rlhf_stages <stage> --config FILE`` for tests: behaviour per stage from ``<volume>/fake-stages.json``.

{"ppo": {"steps": 20, "stepSeconds": 0.2, "fail": "retryable" | "config", "failIndex": 1}} (all optional;
failIndex: in a gang, only the Pod of that index fails, at once, with the retryable error). In a gang
only index 0 writes the output and the result, as the real stages' node 0 does.
Every start is appended to ``<run dir>/fake-starts.log`` as ``<stage> <resume step>``.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import yaml


def main() -> int:
    stage, config = sys.argv[1], sys.argv[sys.argv.index("--config") + 1]
    invocation = yaml.safe_load(Path(config).read_text())
    workspace = Path(invocation["workspace"])
    run = workspace / "runs" / invocation["run"]["namespace"] / invocation["run"]["name"]
    run.mkdir(parents=True, exist_ok=True)
    behaviour_file = workspace / "fake-stages.json"
    behaviour = json.loads(behaviour_file.read_text()).get(stage, {}) if behaviour_file.exists() else {}
    steps, step_seconds = int(behaviour.get("steps", 3)), float(behaviour.get("stepSeconds", 0.1))
    term_log = Path(os.environ.get("RLHF_TERMINATION_LOG", "/dev/termination-log"))
    output, checkpoints = run / stage, run / f"{stage}.checkpoints"

    def finish(code: int, step: int, message: str, metrics: dict | None = None) -> int:
        result = {
            "stage": stage,
            "succeeded": code == 0,
            "step": step,
            "totalSteps": steps,
            "metrics": metrics or {},
            "message": message,
            "exitCode": code,
        }
        if code == 0:
            result["artifactPath"] = str(output.relative_to(workspace))
        term_log.write_text(json.dumps(result))
        return code

    if (output / "manifest.json").exists():
        return finish(0, steps, "already done", json.loads((output / "manifest.json").read_text())["metrics"])
    done = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*")) if checkpoints.exists() else []
    step = done[-1] if done else 0
    with (run / "fake-starts.log").open("a") as log:
        log.write(f"{stage} {step}\n")
    index = os.environ.get("JOB_COMPLETION_INDEX")
    if index is not None and behaviour.get("failIndex") is not None and int(index) == int(behaviour["failIndex"]):
        return finish(1, 0, f"{stage}: node {index} lost its peers (fake)")
    if behaviour.get("fail") == "config":
        return finish(2, 0, f"{stage}: invalid configuration (fake)")
    if behaviour.get("fail") == "retryable":
        return finish(1, 0, f"{stage}: model directory is corrupt (fake)")

    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    while step < steps:
        if stopping:
            (checkpoints / f"checkpoint-{step}").mkdir(parents=True, exist_ok=True)
            return finish(143, step, f"stopped by SIGTERM at step {step}")
        time.sleep(step_seconds)
        step += 1
        (checkpoints / f"checkpoint-{step}").mkdir(parents=True, exist_ok=True)
        progress = {"stage": stage, "step": step, "totalSteps": steps, "metrics": {"loss": 1.0 / step}}
        tmp = run / f".{stage}.progress.json.tmp"
        tmp.write_text(json.dumps(progress))
        os.replace(tmp, run / f"{stage}.progress.json")
    if index not in (None, "0"):
        term_log.write_text(f"node {index} exited 0")
        return 0
    metrics = {"loss": 1.0 / steps}
    if stage == "ppo":
        metrics["reward_mean"] = 0.75
    staging = run / f".{stage}.partial"
    (staging / "model").mkdir(parents=True, exist_ok=True)
    (staging / "model" / "weights.txt").write_text(f"{stage}\n")
    (staging / "manifest.json").write_text(json.dumps({"metrics": metrics}))
    os.replace(staging, output)
    return finish(0, step, "done", metrics)


if __name__ == "__main__":
    sys.exit(main())
