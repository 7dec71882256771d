"""CPU per stage config the operator renders for a new Job: its JSON (``stage_config``, what it writes
since wire_json) against the same invocation dumped with libyaml's emitter (what it wrote before),
for a few examples' policy-optimisation stage. One process, best of three repeats of N renders each.

    PYTHONPATH=operator:stages python benchmarks/stage_config.py [--renders 1000]
"""

from __future__ import annotations

import argparse
import functools
import timeit
from collections.abc import Callable
from pathlib import Path

import yaml

from rlhf_api import RLHFRunSpec
from rlhf_api.layout import RunRef
from rlhf_api.methods import PIPELINES
from rlhf_operator.children import _YAML_DUMPER, build_invocation, stage_config

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = ("tiny.yaml", "tiny-rlaif.yaml", "seed-opt-1.3b.yaml")
RUN = RunRef(namespace="default", name="bench", uid="uid")


def best_ms(render: Callable[[], str], renders: int) -> float:
    return min(timeit.repeat(render, number=renders, repeat=3)) / renders * 1e3


def libyaml_config(spec: RLHFRunSpec, stage: str) -> str:
    """What stage_config returned before wire_json: the same invocation, dumped by libyaml."""
    return yaml.dump(build_invocation(RUN, spec, stage).to_wire(), Dumper=_YAML_DUMPER, sort_keys=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--renders", type=int, default=1000)
    args = parser.parse_args()
    print("| example, stage | config chars | libyaml (before) | JSON (now) |\n|---|---|---|---|")
    for name in EXAMPLES:
        docs = yaml.safe_load_all((REPO / "examples" / name).read_text())
        doc = next(d for d in docs if d and d.get("kind") == "RLHFRun")
        spec = RLHFRunSpec.model_validate(doc["spec"], strict=False)
        stage = PIPELINES[spec.method][-2]  # the stage before the merge: PPO, DPO, ...
        before = best_ms(functools.partial(libyaml_config, spec, stage), args.renders)
        now = best_ms(functools.partial(stage_config, RUN, spec, stage), args.renders)
        chars = len(stage_config(RUN, spec, stage))
        print(f"| {name}, {stage} | {chars} | {before:.2f} ms | {now:.2f} ms |")


if __name__ == "__main__":
    main()
