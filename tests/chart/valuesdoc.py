"""The values table of charts/rlhf-operator/README.md, generated from the `# --` comments in values.yaml.

    python tests/chart/valuesdoc.py           # rewrite the table in the chart README
    python tests/chart/valuesdoc.py --check   # exit 1 when the table is stale

A key's description is the `# -- ` comment block right above it (helm-docs' convention, so that
tool reads the same file). Every key must have one; tests/chart/test_values.py enforces it.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

CHART = Path(__file__).resolve().parents[2] / "charts" / "rlhf-operator"
START, END = "<!-- values:start -->", "<!-- values:end -->"
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_]+):(?: (?P<value>.*))?$")


@dataclass(frozen=True)
class Key:
    path: str
    default: str | None  # None for a map whose keys follow
    description: str


def parse(text: str) -> list[Key]:
    keys: list[Key] = []
    stack: list[tuple[int, str]] = []
    comment: list[str] | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# -- "):
            comment = [stripped[5:]]
            continue
        if stripped.startswith("#"):
            if comment is not None:
                comment.append(stripped.lstrip("#").strip())
            continue
        if not stripped:
            comment = None
            continue
        match = _KEY.match(line)
        if not match:
            raise ValueError(f"values.yaml: cannot read {line!r} (use flow style for lists)")
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [match["key"]])
        value = (match["value"] or "").strip()
        keys.append(Key(path, value or None, " ".join(comment or [])))
        stack.append((indent, match["key"]))
        comment = None
    return keys


def table(keys: list[Key]) -> str:
    rows = ["| Key | Default | Description |", "|---|---|---|"]
    for key in keys:
        default = "" if key.default is None else f"`{key.default}`"
        description = key.description.replace("|", "\\|")
        rows.append(f"| `{key.path}` | {default} | {description} |")
    return "\n".join(rows)


def render_readme(readme: str, values: str) -> str:
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table(parse(values))}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    readme = CHART / "README.md"
    current = readme.read_text()
    wanted = render_readme(current, (CHART / "values.yaml").read_text())
    if args.check:
        if current != wanted:
            print("charts/rlhf-operator/README.md: the values table is stale (run `make generate`)", file=sys.stderr)
            return 1
        return 0
    if current != wanted:
        readme.write_text(wanted)
        print("wrote charts/rlhf-operator/README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
