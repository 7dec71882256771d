"""GPU figures (issue 17 item 4): QLoRA SFT throughput and MFU, PPO step time against TRL 1.12, bitsandbytes
4-bit, checkpoint save time against the grace period, on an OPT-1.3B-shaped model.

    PYTHONPATH=operator:stages python benchmarks/gpu.py [--dry-run] [--workspace DIR] [--json FILE]
    make bench-gpu BENCH_ARGS="--dry-run --json /tmp/gpu.json"

Nothing is downloaded (a GPU machine may have no network): the model is built from an OPTConfig with
OPT-1.3B's published sizes (benchmarks/checkpoint_save.py's ``1.3b`` entry: hidden 2048, 24 layers, 32
heads, ffn 8192, 50272 tokens, 2048 positions) with random weights, saved to the workspace with the tiny
task's locally trained tokenizer (about 550 tokens: the model's extra vocabulary rows are never fed, only
sampled), and the data is synthetic text. Random weights cost the same FLOPs as trained ones; what they
change is only what PPO samples (no EOS, so every response runs to its length budget, on both sides).

1. ``sft``: this project's SFT stage (``python -m rlhf_stages sft``, driven as benchmarks/ppo_vs_trl.py
   drives stages) with QLoRA (4-bit NF4 base, bf16 compute, LoRA with the API's defaults), examples all
   cut to ``maxLength`` tokens, no packing, no eval, no checkpoint inside the timed steps. tokens/s =
   TRL's ``num_tokens`` / the Trainer's ``train_runtime`` (which includes the first, warm-up step).
   MFU = 6 x N x tokens/s / peak, N = every parameter of the model (frozen base and LoRA adapter), the
   usual 6N convention: it leaves out attention's sequence-length term and counts a weight-gradient
   matmul for frozen weights that LoRA never computes (true work is nearer 4N), so it is a convention,
   comparable with other 6N figures, not a count of executed FLOPs. Peak: bf16 dense from PEAK_TFLOPS by
   the device name; an unknown GPU or the CPU gets no MFU (said so).
2. ``ppo``: our PPO stage and TRL 1.12's PPOTrainer (benchmarks/ppo_vs_trl.py's worker, in the venv
   of benchmarks/setup_trl112_env.sh) on the same model (policy, reference through the disabled adapter,
   and value/reward models from the same weights with a fresh score head), float32 and no gradient
   checkpointing on both sides (TRL's defaults turned off), the same batch,
   mini-batch, epochs, LoRA, and a fixed response length (min = max). Step time = training time / steps
   (ours: the sum of the stage's per-step times; TRL: ``trainer.train()``'s time), first step included on
   both sides. Without the TRL venv only ours is reported. The venv must be made before, on a machine
   with network (a GPU machine may have none): ``benchmarks/setup_trl112_env.sh``.
3. ``bnb-4bit``: the model loaded in NF4 (the stages' own BitsAndBytesConfig), a LoRA adapter on it, one
   forward and one backward timed (mean of a few after a warm-up), bitsandbytes' version and torch's CUDA
   build (the bitsandbytes wheel loads its library for that CUDA version).
4. ``checkpoint``: benchmarks/checkpoint_save.py's measurement (write + fsync of the LoRA adapter with its
   AdamW state, of the whole model, and of the model with AdamW state) against the default
   ``runtime.terminationGracePeriodSeconds``.

``--dry-run`` runs everything on the CPU at tiny sizes (a 2-layer OPT of the same code paths, a few steps)
to check the script; its numbers are no GPU figures. Without ``--dry-run`` CUDA is required (exit 2).
Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "stages")]

import checkpoint_save  # noqa: E402
import ppo_vs_trl  # noqa: E402

# bf16 dense peak TFLOPS (vendor data sheets, without sparsity), matched in order on the device name.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)


PARTS = ("sft", "ppo", "bnb", "checkpoint")


@dataclass(frozen=True)
class Sizes:
    shape: str  # an entry of checkpoint_save.SIZES
    sft_batch: int  # sequences per SFT step
    sft_length: int  # tokens per SFT sequence (maxLength)
    sft_steps: int
    ppo_batch: int  # prompts rolled out per PPO step
    ppo_mini_batch: int
    ppo_epochs: int
    ppo_steps: int
    ppo_response: int  # new tokens per response (min = max)
    prompt_words: int  # words per synthetic prompt
    bnb_batch: int  # sequences in the timed NF4 forward/backward
    bnb_length: int
    repeats: int  # timed NF4 forward/backward passes after the warm-up


# On one H200 (2026-11-30) the parts took 47 s (bnb, with the model's build), 67 s (sft), 230 s (ppo with the
# TRL baseline) and 81 s (checkpoint) on its 141 GiB; peak GPU memory was measured in the NF4 part only (30.6 GiB).
REAL = Sizes("1.3b", 8, 1024, 30, 64, 16, 4, 4, 64, 24, 8, 1024, 5)
DRY = Sizes("tiny", 4, 64, 6, 8, 4, 1, 2, 8, 6, 2, 64, 2)

# Synthetic text: the words are arbitrary, only the token counts matter.
WORDS: tuple[str, ...] = (
    *("the", "model", "reads", "a", "long", "text", "about", "rivers", "cities", "music", "science", "history"),
    *("and", "answers", "each", "question", "with", "care", "while", "the", "reader", "waits", "for", "reply"),
)


def device_name(dry_run: bool) -> str:
    import torch

    return "CPU (dry run)" if dry_run else torch.cuda.get_device_name(0)


def peak_tflops(name: str) -> float | None:
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def versions(trl_python: str) -> dict[str, str]:
    import bitsandbytes
    import peft
    import torch
    import transformers
    import trl

    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda (torch build)": str(torch.version.cuda),
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "trl (project)": trl.__version__,
    }
    found["trl (PPO baseline venv)"] = trl_venv_version(trl_python) or "absent"
    return found


def trl_venv_version(python: str) -> str | None:
    import subprocess

    if not Path(python).exists():
        return None
    proc = subprocess.run(
        [python, "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True, check=False
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def synthetic_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def prepare(ws: Path, sizes: Sizes) -> dict[str, int]:
    """The random OPT model with the tiny tokenizer, the SFT and prompt data; parameter counts."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf_api import LoRA
    from rlhf_stages.runtime.models import lora_config
    from rlhf_stages.tiny.assets import build_tokenizer

    model_dir = ws / "assets" / "model"
    config = checkpoint_save.opt_config(sizes.shape)
    if not (model_dir / "config.json").exists():
        started = time.perf_counter()
        tokenizer = build_tokenizer(ws / "assets" / "tokenizer")
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        tmp = model_dir.with_name(".model.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(model_dir)  # a half-written model is never taken for a finished one
        del model
        print(f"model {sizes.shape}: built and saved in {time.perf_counter() - started:.0f} s", flush=True)
    rng = random.Random(0)
    # Each SFT example is about twice maxLength tokens long, so every one is cut to exactly maxLength.
    n_sft = sizes.sft_batch * sizes.sft_steps
    sft_rows = [
        {"question": synthetic_text(rng, 8), "response": synthetic_text(rng, sizes.sft_length * 2)}
        for _ in range(n_sft)
    ]
    write_jsonl(ws / "data" / "sft.jsonl", sft_rows)
    prompts = [{"prompt": synthetic_text(rng, sizes.prompt_words)} for _ in range(max(sizes.ppo_batch, 8))]
    write_jsonl(ws / "data" / "prompts.jsonl", prompts)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
        base = sum(p.numel() for p in meta.parameters())
        lora = sum(
            p.numel() for p in get_peft_model(meta, lora_config(LoRA(), "CAUSAL_LM")).parameters() if p.requires_grad
        )
    return {"base": base, "lora": lora}


def run_spec(**sections: dict[str, Any]) -> dict[str, Any]:
    """A PPO run of the given sections; its other stages are turned off (PPO then starts from the base model)."""
    off = {"enabled": False}
    return {"method": "PPO", "baseModel": {"path": "assets/model"}, "sft": off, "reward": off, "ppo": off, **sections}


def sft_section(sizes: Sizes, dry_run: bool) -> dict[str, Any]:
    return {
        "dataset": {"format": "jsonl", "path": "data/sft.jsonl", "evalFraction": 0.0},
        "lora": {"enabled": True},
        "quantization": {"mode": "4bit", "quantType": "nf4", "computeDtype": "bfloat16"},
        "training": {
            "maxSteps": sizes.sft_steps,
            "perDeviceTrainBatchSize": sizes.sft_batch,
            "maxLength": sizes.sft_length,
            "learningRate": 2e-4,
            "lrSchedulerType": "constant",
            "bf16": not dry_run,
            "loggingSteps": 1,
            "saveSteps": sizes.sft_steps * 10,  # no checkpoint inside the timed steps
        },
        "resources": {"gpus": 0 if dry_run else 1},
    }


def ppo_section(sizes: Sizes, dry_run: bool) -> dict[str, Any]:
    return {
        "dataset": {"format": "jsonl", "path": "data/prompts.jsonl"},
        "promptTemplate": "{prompt}",
        "rewardModel": {"path": "assets/model"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "learningRate": 1e-5,
        "batchSize": sizes.ppo_batch,
        "miniBatchSize": sizes.ppo_mini_batch,
        "ppoEpochs": sizes.ppo_epochs,
        "totalSteps": sizes.ppo_steps,
        "saveFreq": sizes.ppo_steps * 10,  # no checkpoint inside the timed steps
        "adaptiveKl": False,
        # TRL always samples responseLength.max tokens: ours gets the same fixed length.
        "responseLength": {"min": sizes.ppo_response, "max": sizes.ppo_response},
        "resources": {"gpus": 0 if dry_run else 1},
    }


def bench_sft(ws: Path, sizes: Sizes, dry_run: bool, params: dict[str, int], peak: float | None) -> dict[str, Any]:
    from rlhf_stages.runtime.models import ALLOW_CPU_QUANTIZATION_ENV

    if dry_run:
        # bitsandbytes' CPU backend: the stages refuse 4-bit without a GPU unless told (the tests' switch).
        os.environ[ALLOW_CPU_QUANTIZATION_ENV] = "1"
    shutil.rmtree(ppo_vs_trl.run_dir(ws) / "sft", ignore_errors=True)
    wall = ppo_vs_trl.run_stage(ws, "sft", run_spec(sft=sft_section(sizes, dry_run)))
    manifest = json.loads((ppo_vs_trl.run_dir(ws) / "sft" / "manifest.json").read_text())
    history = manifest["details"]["logHistory"]
    runtime = next(h["train_runtime"] for h in reversed(history) if "train_runtime" in h)
    tokens = max((h["num_tokens"] for h in history if "num_tokens" in h), default=None)
    if tokens is None:  # every example is cut to maxLength
        tokens = sizes.sft_steps * sizes.sft_batch * sizes.sft_length
    tokens_per_s = tokens / runtime
    n = params["base"] + params["lora"]
    mfu = 6 * n * tokens_per_s / (peak * 1e12) if peak else None
    return {
        "steps": manifest["step"],
        "tokens": tokens,
        "train_s": runtime,
        "stage_wall_s": wall,
        "tokens_per_s": tokens_per_s,
        "parameters": n,
        "mfu": mfu,
        "train_loss": manifest.get("metrics", {}).get("train_loss"),
    }


PPO_PHASES = ("sampling", "scoring", "update")  # the PPO trainer's step phases, in order


def bench_ppo_ours(ws: Path, sizes: Sizes, dry_run: bool) -> dict[str, Any]:
    section = ppo_section(sizes, dry_run)
    for name in ("ppo", "ppo.checkpoints", ".ppo.partial"):
        shutil.rmtree(ppo_vs_trl.run_dir(ws) / name, ignore_errors=True)
    wall = ppo_vs_trl.run_stage(ws, "ppo", run_spec(ppo=section))
    manifest = json.loads((ppo_vs_trl.run_dir(ws) / "ppo" / "manifest.json").read_text())
    history = manifest["details"]["history"]
    step_s = [h["step_seconds"] for h in history]
    # Where a step's time goes (the trainer's phase clocks; absent from manifests before them).
    phases = {
        phase: sum(h[f"{phase}_seconds"] for h in history) / len(history)
        for phase in PPO_PHASES
        if all(f"{phase}_seconds" in h for h in history)
    }
    return {
        "batch": sizes.ppo_batch,
        "response": sizes.ppo_response,
        "ours": {"steps": len(step_s), "step_s": sum(step_s) / len(step_s), "stage_wall_s": wall, "phases": phases},
        "trl": None,
    }


def bench_ppo_trl(ws: Path, sizes: Sizes, dry_run: bool, trl_python: str) -> dict[str, Any]:
    """TRL 1.12's PPOTrainer on the same model and section; raises when its venv is absent."""
    if trl_venv_version(trl_python) is None:
        raise RuntimeError(
            f"TRL 1.12 venv absent ({trl_python}): only ours measured; make it with benchmarks/setup_trl112_env.sh "
            "on a machine with network before the run (the GPU machine cannot pip install)"
        )
    out = ws / "trl-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    setup = ws / "trl-setup.json"
    model = str(ws / "assets" / "model")
    setup.write_text(
        json.dumps(
            {
                "ppo": ppo_section(sizes, dry_run),
                "policy_path": model,
                "reward_path": model,
                "use_cpu": dry_run,
                # PPOConfig defaults to bf16 and gradient checkpointing; our stage uses neither.
                "precision": {"bf16": False, "gradient_checkpointing": False},
            }
        )
    )
    timing = ppo_vs_trl.run_trl(ws, 0, out, trl_python, setup)
    return {"steps": sizes.ppo_steps, "step_s": timing["train_s"] / sizes.ppo_steps, "wall_s": timing["wall_s"]}


def bench_bnb(ws: Path, sizes: Sizes, dry_run: bool) -> dict[str, Any]:
    """NF4 load, then a forward and a backward through a LoRA adapter; an error is reported, not raised."""
    import bitsandbytes
    import torch

    found: dict[str, Any] = {"bitsandbytes": bitsandbytes.__version__, "cuda_build": torch.version.cuda}
    try:
        found.update(_bnb_timings(ws, sizes, dry_run))
    except Exception as exc:  # on the CPU the point is to report what bitsandbytes does, failure included
        found["error"] = f"{type(exc).__name__}: {exc}"[:500]
    return found


def _bnb_timings(ws: Path, sizes: Sizes, dry_run: bool) -> dict[str, Any]:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf_api import LoRA, Quantization
    from rlhf_stages.runtime.models import ALLOW_CPU_QUANTIZATION_ENV, lora_config, quantization_config

    if dry_run:
        os.environ[ALLOW_CPU_QUANTIZATION_ENV] = "1"
    device = "cpu" if dry_run else "cuda:0"

    def sync() -> None:
        if not dry_run:
            torch.cuda.synchronize()

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        str(ws / "assets" / "model"),
        quantization_config=quantization_config(Quantization(mode="4bit"), "bench"),
        device_map={"": device},
        dtype=torch.bfloat16,
    )
    load_s = time.perf_counter() - started
    layer = type(model.get_decoder().layers[0].fc1)
    model = get_peft_model(model, lora_config(LoRA(), "CAUSAL_LM"))
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (sizes.bnb_batch, sizes.bnb_length), device=device)
    forward, backward = [], []
    for i in range(sizes.repeats + 1):  # the first is a warm-up
        sync()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        if i:
            forward.append(t1 - t0)
            backward.append(t2 - t1)
    return {
        "linear_class": f"{layer.__module__}.{layer.__name__}",
        "load_s": load_s,
        "forward_s": sum(forward) / len(forward),
        "backward_s": sum(backward) / len(backward),
        "tokens": sizes.bnb_batch * sizes.bnb_length,
        "peak_gpu_mib": None if dry_run else torch.cuda.max_memory_allocated() / 2**20,
        "loss": loss.item(),
    }


def bench_checkpoint(ws: Path, sizes: Sizes, directory: Path | None) -> dict[str, Any]:
    where = (directory or ws) / "checkpoint-bench"
    try:
        rows = checkpoint_save.measure(sizes.shape, where)
    finally:
        shutil.rmtree(where, ignore_errors=True)
    return {"grace_s": checkpoint_save.GRACE_S, "directory": str(where.parent), "rows": rows}


def _f(value: float | None, fmt: str = ".2f", missing: str = "–") -> str:
    return missing if value is None else format(value, fmt)


def table(report: dict[str, Any]) -> str:
    lines = [
        f"GPU benchmark, {report['date']}, device: {report['device']}, model: {report['model']}",
        "",
        "| " + " | ".join(report["versions"]) + " |",
        "|" + "---|" * len(report["versions"]),
        "| " + " | ".join(report["versions"].values()) + " |",
        "",
        "| figure | value | how |",
        "|---|---|---|",
    ]
    s = report.get("sft")
    if s is not None:
        mfu = f"{s['mfu'] * 100:.1f} %" if s["mfu"] is not None else f"not reported ({report['mfu_note']})"
        lines += [
            f"| QLoRA SFT tokens/s | {s['tokens_per_s']:,.0f} | {s['tokens']:,.0f} tokens in {s['steps']} steps, "
            f"{s['train_s']:.1f} s train_runtime (stage {s['stage_wall_s']:.0f} s) |",
            f"| QLoRA SFT MFU | {mfu} | 6 x {s['parameters'] / 1e6:,.1f} M params (frozen + LoRA) x tokens/s / "
            f"{_f(report['peak_tflops'], '.0f')} TFLOPS bf16 dense |",
        ]
    p = report.get("ppo")
    if p is not None:
        shape = f"{p['batch']} prompts x {p['response']} new tokens"
        lines.append(
            f"| PPO step time, ours | {p['ours']['step_s']:.2f} s | {shape}, mean of {p['ours']['steps']} steps "
            f"(stage {p['ours']['stage_wall_s']:.0f} s) |"
        )
        for phase, seconds in p["ours"].get("phases", {}).items():
            lines.append(
                f"| PPO step, ours: {phase} | {seconds:.2f} s | {seconds / p['ours']['step_s'] * 100:.0f} % of a step |"
            )
        if p["trl"] is not None:
            lines.append(
                f"| PPO step time, TRL 1.12 PPOTrainer | {p['trl']['step_s']:.2f} s | {shape}, train() / "
                f"{p['trl']['steps']} steps (worker {p['trl']['wall_s']:.0f} s) |"
            )
        else:
            why = report.get("errors", {}).get("ppo-trl", "not run")
            lines.append(f"| PPO step time, TRL 1.12 PPOTrainer | not measured | {why[:300]} |")
    b = report.get("bnb")
    if b is not None and "error" in b:
        lines.append(f"| bitsandbytes 4-bit NF4 | failed | {b['error']} |")
    elif b is not None:
        how = f"{b['tokens']} tokens, {b['linear_class']}, load {b['load_s']:.1f} s"
        if b["peak_gpu_mib"] is not None:
            how += f", peak {b['peak_gpu_mib']:,.0f} MiB"
        lines += [
            f"| NF4 + LoRA forward | {b['forward_s'] * 1e3:,.1f} ms | {how} |",
            f"| NF4 + LoRA backward | {b['backward_s'] * 1e3:,.1f} ms | same batch |",
        ]
    c = report.get("checkpoint") or {"rows": []}
    for r in c["rows"]:
        lines.append(
            f"| checkpoint save, {r['what']} | {r['durable_s']:.2f} s | {r['bytes'] / 1e6:,.1f} MB written and "
            f"fsync'd ({r['bytes'] / 1e6 / r['durable_s']:,.0f} MB/s) = {r['durable_s'] / c['grace_s'] * 100:.2f} % "
            f"of the {c['grace_s']} s grace period |"
        )
    for part, error in report.get("errors", {}).items():
        if part != "ppo-trl":
            lines.append(f"| {part} | failed | {error[:300]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (checks the script only)")
    parser.add_argument("--workspace", type=Path, default=None, help="default /tmp/rlhf-gpu-bench[-dry]")
    parser.add_argument(
        "--checkpoint-dir", type=Path, default=None, help="storage to time saves on (default: workspace)"
    )
    parser.add_argument("--trl-python", default=ppo_vs_trl.TRL_PYTHON)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    args = parser.parse_args(argv)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(
            "benchmarks/gpu.py: no CUDA device (torch.cuda.is_available() is False); run on a GPU machine, "
            "or pass --dry-run for the CPU dry run of tiny sizes",
            file=sys.stderr,
        )
        return 2
    sizes = DRY if args.dry_run else REAL
    ws = (args.workspace or Path("/tmp/rlhf-gpu-bench" + ("-dry" if args.dry_run else ""))).resolve()
    ws.mkdir(parents=True, exist_ok=True)
    name = device_name(args.dry_run)
    peak = None if args.dry_run else peak_tflops(name)
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": name,
        "model": f"OPT-{sizes.shape}-shaped, random weights" if not args.dry_run else "tiny OPT (2 layers), random",
        "sizes": asdict(sizes),
        "versions": versions(args.trl_python),
        "peak_tflops": peak,
        "mfu_note": "CPU dry run" if args.dry_run else f"no peak known for {name!r}" if peak is None else "",
    }
    only = args.only.split(",")
    unknown = set(only) - set(PARTS)
    if unknown:
        parser.error(f"--only: unknown {', '.join(sorted(unknown))} (choose from {', '.join(PARTS)})")
    params = prepare(ws, sizes)

    def save() -> None:
        # After every part: a part that fails or a machine whose time runs out keeps the figures before it.
        if args.json is not None:
            args.json.write_text(json.dumps(report, indent=2))

    def attempt(part: str, key: str, measure: Any, into: dict[str, Any] | None = None) -> bool:
        """``into[key] = measure()`` (``into``: the report), saved at once; a failure is recorded, not raised."""
        target = report if into is None else into
        try:
            target[key] = measure()
            return True
        except (Exception, SystemExit) as exc:  # a stage's failure is SystemExit (ppo_vs_trl.run_stage)
            report.setdefault("errors", {})[part] = f"{type(exc).__name__}: {exc}"[-2000:]
            print(f"{part}: FAILED {report['errors'][part]}", flush=True)
            return False
        finally:
            save()

    if "sft" in only and attempt("sft", "sft", lambda: bench_sft(ws, sizes, args.dry_run, params, peak)):
        print(f"sft: {report['sft']['tokens_per_s']:,.0f} tokens/s", flush=True)
    if "ppo" in only and attempt("ppo", "ppo", lambda: bench_ppo_ours(ws, sizes, args.dry_run)):
        print(f"ppo: ours {report['ppo']['ours']['step_s']:.2f} s/step", flush=True)
        attempt("ppo-trl", "trl", lambda: bench_ppo_trl(ws, sizes, args.dry_run, args.trl_python), report["ppo"])
    if "bnb" in only:
        attempt("bnb", "bnb", lambda: bench_bnb(ws, sizes, args.dry_run))
    if "checkpoint" in only:
        attempt("checkpoint", "checkpoint", lambda: bench_checkpoint(ws, sizes, args.checkpoint_dir))
    print()
    print(table(report))
    return 1 if report.get("errors") else 0


if __name__ == "__main__":
    raise SystemExit(main())
