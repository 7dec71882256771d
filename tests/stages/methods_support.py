"""Harness shared by the method tests (tests/stages/test_methods_*.py) and benchmarks/methods.py.

One *base run* per volume trains SFT and an independent reward model once (the same short settings
as tests/stages/test_pipeline.py). Every method run then gets its own run directory whose ``sft``
(and ``reward``) outputs are links to the base run's, so it starts from exactly the same SFT policy
and is judged by exactly the same reward model. A method stage runs as a real
``python -m rlhf_stages`` process (so its wall time and peak RSS are its own); the policy it leaves
is compared with the SFT policy on the held-out prompts (unseen topics): mean reward-model score
(prompt + completion + EOS) and the ground-truth target rate.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tests.build_cache import cached_build, cached_outputs, training_key
from tests.pythonpath import PYTHON_PATH, REPO

BASE_RUN = "methods-base"
# SFT as in examples/tiny.yaml (3 epochs): fewer steps leave a policy that rarely names the asked
# topic on unseen topics (150 steps: target rate 0.0), which no method can then be judged by. The
# reward model is trained shorter (as in test_pipeline.py); it still ranks held-out pairs well.
SFT_FAST = {"training": {"saveSteps": 1000, "loggingSteps": 25}}
REWARD_FAST = {"promptTemplate": "{prompt}", "training": {"maxSteps": 150, "saveSteps": 1000, "loggingSteps": 25}}
EVAL_SAMPLES_PER_PROMPT = 2
EVAL_MAX_NEW_TOKENS = 32
EVAL_SEED = 1234


WORKSPACE_ENV = "RLHF_METHODS_WORKSPACE"


def methods_workspace(session_workspace: Path) -> Path:
    """The volume the method tests use: ``$RLHF_METHODS_WORKSPACE`` when set (reuses its base run and
    assets across sessions, e.g. the benchmark's), else the session's fresh one."""
    override = os.environ.get(WORKSPACE_ENV)
    return Path(override) if override else session_workspace


def example_spec(method: str) -> dict[str, Any]:
    """The spec of examples/tiny-<method>.yaml (or examples/tiny.yaml for the base run)."""
    name = "tiny.yaml" if method == "base" else f"tiny-{method.lower()}.yaml"
    return yaml.safe_load((REPO / "examples" / name).read_text())["spec"]


def merge_into(spec: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``spec`` with ``changes`` merged in recursively (None deletes a key)."""
    out = copy.deepcopy(spec)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_into(out[key], value)
        else:
            out[key] = value
    return out


def run_dir(workspace: Path, run: str) -> Path:
    return workspace / "runs" / "default" / run


@dataclass
class StageRun:
    """One stage process: its result, wall time and peak resident memory."""

    code: int
    output: str
    result: dict[str, Any]
    seconds: float
    peak_rss_mib: float


def run_stage(
    workspace: Path,
    stage: str,
    run: str,
    spec: dict[str, Any],
    timeout: float = 900,
    extra_env: dict[str, str] | None = None,
) -> StageRun:
    """``python -m rlhf_stages <stage>`` as a child process (``extra_env`` added to its environment);
    peak RSS from ``wait4`` of that child."""
    config = workspace / "configs" / f"{run}-{stage}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    body = {"stage": stage, "run": {"name": run}, "workspace": str(workspace), "spec": spec}
    config.write_text(yaml.safe_dump(body))
    result_file = workspace / "configs" / f"{run}-{stage}.result.json"
    env = {
        **os.environ,
        "PYTHONPATH": PYTHON_PATH,
        "RLHF_TERMINATION_LOG": str(result_file),
        "WANDB_MODE": "offline",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    env.pop("RLHF_ALLOW_CPU_QUANTIZATION", None)
    env.update(extra_env or {})
    log_file = workspace / "configs" / f"{run}-{stage}.log"
    started = time.monotonic()
    with log_file.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rlhf_stages", stage, "--config", str(config)],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - started
    result = json.loads(result_file.read_text()) if result_file.exists() and result_file.stat().st_size else {}
    return StageRun(proc.returncode, log_file.read_text()[-6000:], result, seconds, usage.ru_maxrss / 1024)


def ensure_base(workspace: Path) -> Path:
    """Assets, SFT and the reward model, once per volume (a complete stage exits at once); the
    trained outputs come from the build cache when a session on this machine trained them already."""
    if not (workspace / "assets" / "base-model").is_dir():
        from rlhf_stages.tiny.assets import build_tiny_assets

        build_tiny_assets(workspace / "assets", seed=0)
    spec = merge_into(example_spec("base"), {"sft": SFT_FAST, "reward": REWARD_FAST})

    def train() -> None:
        for stage in ("sft", "reward"):
            done = run_stage(workspace, stage, BASE_RUN, spec)
            assert done.code == 0, done.output

    key = training_key(workspace / "assets", {"run": BASE_RUN, "spec": spec})
    cached_outputs("methods-base", key, run_dir(workspace, BASE_RUN), train)
    train()  # exits at once for complete outputs of these settings (and says so), trains otherwise
    return run_dir(workspace, BASE_RUN)


def ensure_judge(workspace: Path) -> dict[str, Any]:
    """The tiny RLAIF judge under ``assets/judge`` and its report.

    Training it is the slowest set-up of the suite (about 150 s on 2 cores) and its result depends
    only on the assets it reads, the stage and API code and the libraries, so it is trained once per
    machine into the build cache (tests/build_cache.py) keyed by exactly those, and copied in.
    """
    import shutil

    judge = workspace / "assets" / "judge"
    if not (judge / "judge.json").is_file():
        from rlhf_stages.tiny.judge import DEFAULT_STEPS, build_tiny_judge

        key = training_key(workspace / "assets", {"tiny_judge": {"steps": DEFAULT_STEPS, "seed": 0}})
        cached = cached_build("tiny-judge", key, lambda out: build_tiny_judge(workspace / "assets", out))
        shutil.rmtree(judge, ignore_errors=True)
        shutil.copytree(cached, judge)
    return dict(json.loads((judge / "judge.json").read_text()))


def link_base(workspace: Path, run: str, stages: tuple[str, ...] = ("sft", "reward")) -> Path:
    """A fresh run directory whose ``sft``/``reward`` outputs are the base run's."""
    import shutil

    target = run_dir(workspace, run)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for stage in stages:
        (target / stage).symlink_to(run_dir(workspace, BASE_RUN) / stage, target_is_directory=True)
    return target


@dataclass
class Evaluation:
    reward_mean: float
    """Mean reward-model score (prompt + completion + EOS)."""
    target_rate: float
    """Fraction of answers meeting the target behaviour (tiny.ground_truth.meets_target)."""
    ground_truth_mean: float
    """Mean graded ground truth in [-1, 1] (tiny.ground_truth.ground_truth_score)."""
    not_positive_rate: float
    """Fraction of answers failing the sentiment criterion alone (no more positive than negative words)."""
    off_topic_rate: float
    """Fraction of answers that do not name the asked topic (the hard part on unseen topics)."""
    eos_rate: float
    details: dict[str, Any] = field(default_factory=dict)


_CACHE: dict[str, Any] = {}


def _reward_model(workspace: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    key = f"rm:{workspace}"
    if key not in _CACHE:
        path = run_dir(workspace, BASE_RUN) / "reward" / "model"
        _CACHE[key] = (
            AutoModelForSequenceClassification.from_pretrained(path).eval(),
            AutoTokenizer.from_pretrained(path),
        )
    return _CACHE[key]


def load_policy(workspace: Path, stage_dir: Path | None) -> tuple[Any, Any]:
    """The SFT policy (``stage_dir`` None) or a method's: its adapter on sft/model, or its full model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sft = run_dir(workspace, BASE_RUN) / "sft" / "model"
    tokenizer = AutoTokenizer.from_pretrained(sft)
    if stage_dir is None:
        return AutoModelForCausalLM.from_pretrained(sft).eval(), tokenizer
    if (stage_dir / "adapter").is_dir():
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft), stage_dir / "adapter")
        return model.merge_and_unload().eval(), tokenizer
    return AutoModelForCausalLM.from_pretrained(stage_dir / "model").eval(), tokenizer


def evaluate(workspace: Path, stage_dir: Path | None) -> Evaluation:
    """Reward-model score and ground truth of samples on the held-out prompts (unseen topics)."""
    from rlhf_stages.tiny.evaluate import evaluate_policy, load_prompts

    policy, tokenizer = load_policy(workspace, stage_dir)
    reward_model, reward_tokenizer = _reward_model(workspace)
    summary = evaluate_policy(
        policy,
        tokenizer,
        load_prompts(workspace / "assets" / "data" / "eval_prompts.jsonl"),
        reward_model=reward_model,
        reward_tokenizer=reward_tokenizer,
        max_new_tokens=EVAL_MAX_NEW_TOKENS,
        seed=EVAL_SEED,
        samples_per_prompt=EVAL_SAMPLES_PER_PROMPT,
    )
    failures = summary["failure_rates"]
    return Evaluation(
        summary["reward_mean"],
        summary["target_rate"],
        summary["ground_truth_mean"],
        failures.get("not_positive", 0.0),
        failures.get("off_topic", 0.0),
        summary["eos_rate"],
        {k: summary[k] for k in ("failure_rates", "mean_length_words", "samples")},
    )


def summary_line(name: str, sft: Evaluation, run: MethodRun) -> str:
    e = run.evaluation
    return (
        f"{name} seed {run.seed}: reward {sft.reward_mean:.3f} -> {e.reward_mean:.3f}, target rate "
        f"{sft.target_rate:.3f} -> {e.target_rate:.3f}, ground truth {sft.ground_truth_mean:.3f} -> "
        f"{e.ground_truth_mean:.3f}, not positive {sft.not_positive_rate:.3f} -> {e.not_positive_rate:.3f}, "
        f"off topic {sft.off_topic_rate:.3f} -> {e.off_topic_rate:.3f}, eos {e.eos_rate:.3f}, "
        f"{run.stage.seconds:.0f} s, peak RSS {run.stage.peak_rss_mib:.0f} MiB, "
        f"metrics {run.stage.result['metrics']}"
    )


def sft_evaluation(workspace: Path) -> Evaluation:
    key = f"sft:{workspace}"
    if key not in _CACHE:
        _CACHE[key] = evaluate(workspace, None)
    return _CACHE[key]


@dataclass
class MethodRun:
    seed: int
    stage: StageRun
    evaluation: Evaluation
    extra: dict[str, Any] = field(default_factory=dict)


def run_method(
    workspace: Path,
    method: str,
    stage: str,
    seed: int,
    changes: dict[str, Any] | None = None,
    *,
    before: tuple[str, ...] = (),
) -> MethodRun:
    """Run ``stage`` of examples/tiny-<method>.yaml (plus ``changes``) for one seed and evaluate it.

    ``before`` are stages of the method's own to run first in the same run (e.g. rlaif before dpo).
    """
    done, extra = _train(workspace, method, stage, seed, changes, before)
    return MethodRun(seed, done, evaluate(workspace, run_dir(workspace, _run_name(method, stage, seed)) / stage), extra)


def run_methods(
    workspace: Path,
    method: str,
    stage: str,
    changes: dict[int, dict[str, Any]],
    *,
    before: tuple[str, ...] = (),
) -> list[MethodRun]:
    """:func:`run_method` for each seed in ``changes`` (seed -> its changes), the seeds' stage processes
    side by side: each is one single-threaded process, so one at a time left a core of a 2-core
    machine idle. Each seed's run is seeded and separate, so its models and numbers are the ones it
    gives alone; only its wall time (``StageRun.seconds``) includes the sharing of the cores. The
    evaluations follow one at a time, in this process."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(changes)) as pool:
        trained = {
            seed: pool.submit(_train, workspace, method, stage, seed, seed_changes, before)
            for seed, seed_changes in changes.items()
        }
        done = {seed: future.result() for seed, future in trained.items()}
    return [
        MethodRun(
            seed, stage_run, evaluate(workspace, run_dir(workspace, _run_name(method, stage, seed)) / stage), extra
        )
        for seed, (stage_run, extra) in done.items()
    ]


def _run_name(method: str, stage: str, seed: int) -> str:
    return f"{method.lower()}-{stage}-s{seed}"


def _train(
    workspace: Path,
    method: str,
    stage: str,
    seed: int,
    changes: dict[str, Any] | None,
    before: tuple[str, ...],
) -> tuple[StageRun, dict[str, Any]]:
    """The stages of one seed's run (``before``, then ``stage``) on a fresh link to the base run."""
    run = _run_name(method, stage, seed)
    link_base(workspace, run)
    spec = example_spec(method)
    fast = {"sft": SFT_FAST, **({"reward": REWARD_FAST} if "reward" in spec else {})}
    spec = merge_into(merge_into(spec, fast), changes or {})
    extra: dict[str, Any] = {}
    for earlier in before:
        done = run_stage(workspace, earlier, run, spec)
        assert done.code == 0, done.output
        extra[earlier] = done
    done = run_stage(workspace, stage, run, spec)
    assert done.code == 0, done.output
    return done, extra
