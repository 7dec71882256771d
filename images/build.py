#!/usr/bin/env python3
"""Build the project's images on this machine, with no registry, and load them into containerd.

    python3 images/build.py --containerd-address /run/x/containerd.sock [--namespace k8s.io]
                            [--pause-binary PATH] [--only pause,operator,stages]

The published images start from registry bases (python, nvidia/cuda, ghcr.io uv) that this machine
cannot pull, so the same Dockerfiles are built here from bases made here:

- ``localhost/rlhf-debian-base:<hash>``: Debian bookworm from debootstrap (minbase) plus Python 3.11
  and this machine's CA certificates (its network's egress proxy signs TLS with one of them);
- ``localhost/uv:<version>``: the uv binary, unpacked from the uv wheel on PyPI;
- ``localhost/rlhf-pause:<hash>``: the Pod sandbox image, the static ``pause`` binary and nothing else.

``localhost/rlhf-operator:<hash>`` and ``localhost/rlhf-stages:<hash>`` are tagged with a hash of
every input of their build (Dockerfile, lock file, copied sources, .dockerignore, base, build args),
so an image whose tag containerd already holds is up to date and is skipped without building: that
is the warm path, and it only reads files and asks containerd for its image list.

Standalone on purpose (standard library only, no project imports): it runs before any project
environment exists. Logs go to stderr; stdout carries one JSON object (references, timings, sizes).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

# Bump when a change here changes what gets built, so cached bases and images are rebuilt.
SCRIPT_VERSION = "1"

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("RLHF_CACHE_DIR", Path.home() / ".cache" / "rlhf-operator")) / "buildah"

DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# What the Dockerfiles need of a base: an interpreter, venv (the operator's `python -m venv`), the
# `python` name (the operator's ENTRYPOINT), and CAs for TLS to PyPI. Nothing else.
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
# This machine's own trust anchors (update-ca-certificates' input), copied into the base.
LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")

UV_VERSION = "0.13.8"

# The images this script loads into containerd, in build order.
TARGETS = ("pause", "operator", "stages")


def log(message: str) -> None:
    print(f"[images/build.py] {message}", file=sys.stderr, flush=True)


def digest(*parts: bytes | str) -> str:
    """A short hash of ``parts``; each part is length-prefixed so no two lists hash alike."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big") + data)
    return h.hexdigest()[:16]


def run(cmd: list[str]) -> None:
    """Run ``cmd`` with its output on stderr, so that stdout stays the JSON answer."""
    log("$ " + shlex.join(cmd))
    subprocess.run(cmd, check=True, stdout=sys.stderr)


# --- inputs and their hash (pure: no engine needed) ----------------------------------------------


def dockerfile_sources(text: str) -> list[str]:
    """The build-context paths a Dockerfile COPYs (``COPY --from=`` reads another stage, not the
    context). Continuation lines are joined first; flags are skipped; the last word is the
    destination."""
    sources: list[str] = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        words = line.split()
        if not words or words[0].upper() not in ("COPY", "ADD"):
            continue
        args = words[1:]
        if any(a.startswith("--from=") for a in args):
            continue
        paths = [a for a in args if not a.startswith("--")]
        sources += paths[:-1]
    return sources


def _ignored(path: Path) -> bool:
    # The "never" rules of .dockerignore: caches and bytecode do not enter the context, so they
    # must not change the hash either (a test run writes __pycache__ everywhere).
    junk = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
    return bool(junk & set(path.parts)) or path.suffix == ".pyc"


def context_files(repo: Path, sources: list[str]) -> list[Path]:
    """Every file the COPYs read, sorted, as paths relative to ``repo``."""
    files: set[Path] = set()
    for source in sources:
        root = repo / source.rstrip("/")
        if root.is_dir():
            files |= {p.relative_to(repo) for p in root.rglob("*") if p.is_file() and not _ignored(p.relative_to(repo))}
        elif root.is_file():
            files.add(root.relative_to(repo))
        else:
            raise FileNotFoundError(f"COPY source {source} is not in {repo}")
    return sorted(files)


def input_hash(repo: Path, dockerfile: Path, build_args: dict[str, str]) -> str:
    """The hash of everything an image build reads: the Dockerfile, the .dockerignore, each copied
    file (name and content; the lock file is one of them), the build args (which name the bases by
    their own input hashes) and this script's version."""
    text = dockerfile.read_text()
    parts: list[bytes | str] = [SCRIPT_VERSION, text]
    dockerignore = repo / ".dockerignore"
    parts.append(dockerignore.read_bytes() if dockerignore.exists() else b"")
    for rel in context_files(repo, dockerfile_sources(text)):
        parts += [str(rel), (repo / rel).read_bytes()]
    parts += [f"{key}={value}" for key, value in sorted(build_args.items())]
    return digest(*parts)


def base_hash() -> str:
    cas = sorted(LOCAL_CA_DIR.glob("**/*.crt")) if LOCAL_CA_DIR.is_dir() else []
    return digest(SCRIPT_VERSION, DEBIAN_SUITE, DEBIAN_MIRROR, *BASE_PACKAGES, *(p.read_bytes() for p in cas))


def refs(pause_binary: Path | None) -> dict[str, str]:
    """Every image's reference, computed from the inputs alone (no build needed to know them)."""
    out = {"base": f"localhost/rlhf-debian-base:{base_hash()}", "uv": f"localhost/uv:{UV_VERSION}"}
    if pause_binary is not None:
        out["pause"] = f"localhost/rlhf-pause:{digest(SCRIPT_VERSION, pause_binary.read_bytes())}"
    for name, args in app_build_args(out).items():
        out[name] = f"localhost/rlhf-{name}:{input_hash(REPO, REPO / 'images' / name / 'Dockerfile', args)}"
    return out


def app_build_args(refs_: dict[str, str]) -> dict[str, dict[str, str]]:
    """The build args that point each Dockerfile at the local bases. REVISION/CREATED stay at
    their defaults: a commit or a clock must not invalidate an image whose inputs did not change."""
    return {
        "operator": {"PYTHON_IMAGE": refs_["base"]},
        "stages": {
            "CUDA_IMAGE": refs_["base"],
            "UV_IMAGE": refs_["uv"],
            "PYTHON_VERSION": "system",  # `uv python install` downloads from GitHub: unreachable here
            "UV_SYSTEM_CERTS": "true",  # the base trusts this network's CAs; uv's bundled roots do not
        },
    }


# --- tools ---------------------------------------------------------------------------------------


def ensure_tools() -> None:
    """buildah builds, debootstrap makes the base; Debian packages both."""
    missing = [tool for tool in ("buildah", "debootstrap") if shutil.which(tool) is None]
    if missing:
        run(["apt-get", "update"])
        run(["apt-get", "install", "-y", "--no-install-recommends", *missing])


class Buildah:
    """buildah with its storage in the cache (not /var/lib/containers, not the clone), shared by
    every clone of the project, so a fresh clone reuses the layers already built."""

    def __init__(self, cache: Path) -> None:
        self.root = cache / "storage"
        self.tmp = cache / "tmp"  # buildah's TMPDIR: also where its RUN --mount=type=cache dirs live
        for d in (self.root, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "TMPDIR": str(self.tmp)}

    def cmd(self, *args: str) -> list[str]:
        return [
            "buildah",
            "--root",
            str(self.root),
            "--runroot",
            str(self.root / "run"),
            "--storage-driver",
            "overlay",
            *args,
        ]

    def __call__(self, *args: str, capture: bool = False) -> str:
        full = self.cmd(*args)
        log("$ " + shlex.join(full))
        out = subprocess.PIPE if capture else sys.stderr
        proc = subprocess.run(full, check=True, text=True, env=self.env, stdout=out)
        return (proc.stdout or "").strip()

    def has_image(self, ref: str) -> bool:
        inspect = self.cmd("inspect", "--type", "image", ref)
        return subprocess.run(inspect, check=False, env=self.env, capture_output=True).returncode == 0

    def forget_older(self, ref: str) -> None:
        """Untag the earlier builds of ``ref``'s repository: each source change makes a new tag, and
        their shared layers (the venv) stay, so this frees only what no current image uses. The
        untagged layer-cache steps stay too, for the next --layers build."""
        repo = ref.rsplit(":", 1)[0]
        listing = self("images", "--format", "{{.Name}}:{{.Tag}}", capture=True)
        for older in {line for line in listing.splitlines() if line.rsplit(":", 1)[0] == repo and line != ref}:
            self("rmi", older)

    @contextlib.contextmanager
    def scratch(self) -> Iterator[str]:
        """A working container from nothing, removed afterwards whatever happens."""
        container = self("from", "--pull=never", "scratch", capture=True)
        try:
            yield container
        finally:
            subprocess.run(self.cmd("rm", container), check=False, env=self.env, capture_output=True)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """One build at a time: two would race on the same tags and on the uv cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another build ({path})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


# --- the images ----------------------------------------------------------------------------------


def build_base(buildah: Buildah, ref: str) -> None:
    """debootstrap straight into a scratch container's mount, then commit it."""
    with buildah.scratch() as container:
        rootfs = Path(buildah("mount", container, capture=True))
        run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                DEBIAN_SUITE,
                str(rootfs),
                DEBIAN_MIRROR,
            ]
        )
        if LOCAL_CA_DIR.is_dir():
            shutil.copytree(LOCAL_CA_DIR, rootfs / "usr/local/share/ca-certificates", dirs_exist_ok=True)
            run(["chroot", str(rootfs), "update-ca-certificates"])
        # Package lists and .debs are what debootstrap fetched, not what the image runs.
        for junk in ("var/lib/apt/lists", "var/cache/apt/archives", "var/log"):
            for child in (rootfs / junk).glob("*"):
                if child.is_file() or child.is_symlink():
                    child.unlink()
                elif child.is_dir() and child.name != "partial":
                    shutil.rmtree(child)
        buildah("umount", container)
        buildah("config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", container)
        buildah("config", "--cmd", '["python3"]', "--label", f"rlhf-operator.inputs={ref.rsplit(':', 1)[1]}", container)
        buildah("commit", "--rm", container, ref)


def build_uv(buildah: Buildah, ref: str) -> None:
    """The binary of the uv wheel (PyPI is reachable, ghcr.io is not), at /uv as in uv's image."""
    with tempfile.TemporaryDirectory(dir=buildah.tmp) as tmp:
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--dest",
                tmp,
                f"uv=={UV_VERSION}",
            ]
        )
        (wheel,) = Path(tmp).glob("uv-*.whl")
        binary = Path(tmp) / "uv"
        binary.write_bytes(zipfile.ZipFile(wheel).read(f"uv-{UV_VERSION}.data/scripts/uv"))
        binary.chmod(0o755)
        with buildah.scratch() as container:
            buildah("copy", "--chmod", "0755", container, str(binary), "/uv")
            buildah("config", "--entrypoint", '["/uv"]', container)
            buildah("commit", "--rm", container, ref)


def build_pause(buildah: Buildah, ref: str, binary: Path) -> None:
    """The Pod sandbox: one static binary holding the Pod's namespaces, as the upstream pause image."""
    with buildah.scratch() as container:
        buildah("copy", "--chmod", "0755", container, str(binary), "/pause")
        buildah("config", "--entrypoint", '["/pause"]', container)
        buildah("commit", "--rm", container, ref)


def build_app(buildah: Buildah, name: str, ref: str, build_args: dict[str, str]) -> None:
    """``buildah bud`` of images/<name>/Dockerfile from the repository root, never pulling.

    --layers keeps each step's layer, so a source change rebuilds only the COPY of the sources, not
    the 6 GB venv. The host network and an nofile limit within the hard limit let RUN steps work
    without CNI and without CAP_SYS_RESOURCE."""
    nofile = subprocess.run(["sh", "-c", "ulimit -Hn"], capture_output=True, text=True, check=True).stdout.strip()
    args = [
        "bud",
        "--pull=never",
        "--layers",
        "--force-rm",  # intermediate containers go even when a step fails (a failed build left them all)
        "--network=host",
        f"--ulimit=nofile={nofile}:{nofile}",
        "--label",
        f"rlhf-operator.inputs={ref.rsplit(':', 1)[1]}",
        "-f",
        str(REPO / "images" / name / "Dockerfile"),
        "-t",
        ref,
    ]
    for key, value in sorted(build_args.items()):
        args += ["--build-arg", f"{key}={value}"]
    buildah(*args, str(REPO))
    buildah.forget_older(ref)


# --- containerd ----------------------------------------------------------------------------------


class Containerd:
    def __init__(self, address: str, namespace: str) -> None:
        self.base = ["ctr", "--address", address, "--namespace", namespace]

    def images(self) -> dict[str, str]:
        """reference -> size as ctr prints it (the content size: uncompressed layers here)."""
        out = subprocess.run([*self.base, "images", "ls"], check=True, capture_output=True, text=True).stdout
        sizes = {}
        for line in out.splitlines()[1:]:
            # REF TYPE DIGEST SIZE(value unit) PLATFORMS LABELS
            fields = line.split()
            if len(fields) >= 5:
                sizes[fields[0]] = f"{fields[3]} {fields[4]}"
        return sizes

    def load(self, buildah: Buildah, ref: str) -> dict[str, float]:
        """Via an uncompressed docker-archive: ctr names the image from its RepoTags (an OCI archive
        would need --base-name), and no gzip of gigabytes on a small machine. Returns the seconds
        of each half: the whole image travels even when containerd has all but one layer."""
        archive = buildah.tmp / (re.sub(r"[^\w.-]", "_", ref) + ".tar")
        archive.unlink(missing_ok=True)
        try:
            t0 = time.monotonic()
            buildah("push", "--quiet", ref, f"docker-archive:{archive}:{ref}")
            t1 = time.monotonic()
            run([*self.base, "images", "import", str(archive)])
            return {"export": round(t1 - t0, 1), "import": round(time.monotonic() - t1, 1)}
        finally:
            archive.unlink(missing_ok=True)

    def forget_older(self, ref: str) -> None:
        """Remove the earlier builds of ``ref``'s repository from containerd, as Buildah.forget_older
        does from the build storage. Why: each source change loads a new multi-gigabyte stage image,
        and nothing else removes the old ones (two CI runs filled the disk). containerd's garbage
        collector keeps the content a container still uses; the node tier loads images while it
        holds the node lock, so no test of another tree is running on an image removed here."""
        repo = ref.rsplit(":", 1)[0]
        older = [name for name in self.images() if name.rsplit(":", 1)[0] == repo and name != ref]
        if older:
            run([*self.base, "images", "rm", *older])


# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--containerd-address", required=True, help="containerd's gRPC socket")
    parser.add_argument("--namespace", default="k8s.io", help="containerd namespace (the CRI's is k8s.io)")
    parser.add_argument("--pause-binary", type=Path, help="static pause binary (tests/controlplane/build.sh)")
    parser.add_argument("--only", default=",".join(TARGETS), help=f"comma-separated subset of {','.join(TARGETS)}")
    args = parser.parse_args(argv)
    wanted = [t.strip() for t in args.only.split(",") if t.strip()]
    if unknown := set(wanted) - set(TARGETS):
        parser.error(f"--only: unknown {sorted(unknown)}")
    if "pause" in wanted and (args.pause_binary is None or not args.pause_binary.is_file()):
        parser.error("the pause image needs --pause-binary PATH (or leave pause out of --only)")

    started = time.monotonic()
    timings: dict[str, float] = {}
    names = refs(args.pause_binary if "pause" in wanted else None)
    containerd = Containerd(args.containerd_address, args.namespace)
    present = containerd.images()
    todo = [t for t in wanted if names[t] not in present]
    for target in wanted:
        if target not in todo:
            log(f"{target}: {names[target]} already in containerd")

    if todo:
        with locked(CACHE / "build.lock"):
            ensure_tools()
            buildah = Buildah(CACHE)
            build_args = app_build_args(names)

            def ensure(name: str, build: Callable[[], None]) -> None:
                if buildah.has_image(names[name]):
                    log(f"{name}: {names[name]} already built")
                    return
                t0 = time.monotonic()
                build()
                timings[f"build_{name}"] = round(time.monotonic() - t0, 1)

            for target in todo:
                if target == "pause":
                    ensure("pause", lambda: build_pause(buildah, names["pause"], args.pause_binary))
                else:
                    ensure("base", lambda: build_base(buildah, names["base"]))
                    if target == "stages":
                        ensure("uv", lambda: build_uv(buildah, names["uv"]))
                    ensure(target, functools.partial(build_app, buildah, target, names[target], build_args[target]))
                for step, seconds in containerd.load(buildah, names[target]).items():
                    timings[f"{step}_{target}"] = seconds
                containerd.forget_older(names[target])
        present = containerd.images()

    timings["total"] = round(time.monotonic() - started, 1)
    result: dict[str, object] = {t: names[t] for t in wanted}
    result["timings"] = timings
    result["sizes"] = {t: present.get(names[t]) for t in wanted}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
