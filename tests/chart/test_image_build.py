"""images/build.py's pure parts, without buildah or containerd: what its input hash covers, and the
defaults the Dockerfiles keep for the published images while build.py points them at local bases."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

from .test_images import IMAGES, copies, parse
from .tools import REPO


def _load_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("images_build", REPO / "images" / "build.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclass/typing look the module up by name
    spec.loader.exec_module(module)
    return module


build = _load_build()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A copy of what the stage image's build reads, to change one file at a time."""
    for rel in (
        "images/stages/Dockerfile",
        "images/stages/requirements.txt",
        ".dockerignore",
        "operator/rlhf_operator/__init__.py",
        "operator/rlhf_api",
        "stages/rlhf_stages",
    ):
        src, dst = REPO / rel, tmp_path / rel
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    return tmp_path


def _hash(repo: Path, **args: str) -> str:
    return build.input_hash(repo, repo / "images/stages/Dockerfile", {"CUDA_IMAGE": "localhost/base:1", **args})


def test_input_hash_follows_every_input_and_nothing_else(repo: Path) -> None:
    before = _hash(repo)
    assert _hash(repo) == before  # deterministic
    # Bytecode and caches never enter the build context: a test run must not force a rebuild.
    (repo / "stages/rlhf_stages/__pycache__").mkdir()
    (repo / "stages/rlhf_stages/__pycache__/x.cpython-311.pyc").write_bytes(b"\0")
    assert _hash(repo) == before
    seen = {before}
    for rel in ("stages/rlhf_stages/__main__.py", "images/stages/requirements.txt", "images/stages/Dockerfile"):
        path = repo / rel
        path.write_text(path.read_text() + "\n# changed\n")
        seen.add(_hash(repo))
    (repo / "operator/rlhf_api/new_module.py").write_text("")  # a new copied file
    seen.add(_hash(repo))
    (repo / ".dockerignore").write_text("*\n")
    seen.add(_hash(repo))
    seen.add(_hash(repo, CUDA_IMAGE="localhost/base:2"))  # another base
    assert len(seen) == 7


def test_build_reads_the_same_copy_sources_as_the_image_checks() -> None:
    for dockerfile in IMAGES.values():
        expected = [src for stage in parse(dockerfile) for src, _ in copies(stage)]
        assert build.dockerfile_sources(dockerfile.read_text()) == expected


def test_local_build_args_are_declared_and_the_defaults_stay_the_published_bases() -> None:
    refs = {"base": "localhost/rlhf-debian-base:x", "uv": "localhost/uv:y"}
    for name, args in build.app_build_args(refs).items():
        text = (REPO / "images" / name / "Dockerfile").read_text()
        for key in args:
            assert f"ARG {key}" in text, f"{name}: build.py passes {key}, the Dockerfile does not declare it"
    operator = (REPO / "images/operator/Dockerfile").read_text()
    stages = (REPO / "images/stages/Dockerfile").read_text()
    assert "ARG PYTHON_IMAGE=python:3.11-slim-bookworm\n" in operator
    assert "ARG CUDA_IMAGE=nvidia/cuda:" in stages and "ARG UV_IMAGE=ghcr.io/astral-sh/uv:" in stages
    assert "ARG PYTHON_VERSION=3.11.7\n" in stages  # the interpreter the lock was tested with
    assert f"ARG UV_IMAGE=ghcr.io/astral-sh/uv:{build.UV_VERSION}\n" in stages  # one uv, both ways
    # The final stage copies /opt/python, which the system-interpreter branch must still create.
    assert "mkdir -p /opt/python" in stages


def test_pause_is_required_only_when_asked_for() -> None:
    with pytest.raises(SystemExit):
        build.main(["--containerd-address", "/nonexistent.sock", "--only", "pause"])
    with pytest.raises(SystemExit):
        build.main(["--containerd-address", "/nonexistent.sock", "--only", "bogus"])
