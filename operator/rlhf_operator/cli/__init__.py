"""``rlhfctl``: validate, render and run RLHFRuns locally, and inspect them on a cluster.

Each subcommand lives in its own module; cluster clients and the training stack are imported only
when a command needs them, so ``rlhfctl validate`` stays fast and works anywhere.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("validate", "check an RLHFRun file as admission would (schema and rules), with field paths"),
    "render": ("render", "print the Kubernetes objects the operator would create for each stage"),
    "run-local": ("local", "run the stages in order as local processes, the volume a local directory"),
    "quickstart": ("quickstart", "build tiny assets, run the tiny pipeline on the CPU and write a report"),
    "dev": ("dev", "start a local control plane, the operator and the local kubelet"),
    "status": ("cluster", "show a run's stages as a table"),
    "logs": ("cluster", "print the logs of a run's stage"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhfctl", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(f"{__name__}.{module_name}")
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(name, sub)
        sub.set_defaults(handler=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
