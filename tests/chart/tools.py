"""Helpers for the chart tests: helm and kubeconform (built by tests/tools/build.sh), value sets,
and JSON schemas for kubeconform generated from the test API server's own OpenAPI v3."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from rlhf_operator.dev.controlplane import ControlPlane

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "rlhf-operator"
BUILD_SCRIPT = REPO / "tests" / "tools" / "build.sh"
KUBE_VERSION = "1.34.4"  # the test API server's version (tests/controlplane/go.mod)


@functools.cache
def tools_dir() -> Path:
    """Directory with helm and kubeconform; builds them on first use (cached outside the clone)."""
    override = os.environ.get("RLHF_CHARTTOOLS_BIN")
    if override:
        return Path(override)
    out = subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


class Helm:
    """helm with its own cache/config/data directories, so tests never touch the user's."""

    def __init__(self, home: Path) -> None:
        self.bin = tools_dir() / "helm"
        self.env = dict(os.environ)
        for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
            self.env[var] = str(home / var.lower())
        self.env.pop("KUBECONFIG", None)
        self.home = home

    def __call__(
        self, *args: str, kubeconfig: Path | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin), *args] + (["--kubeconfig", str(kubeconfig)] if kubeconfig else [])
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=self.env, timeout=180)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def values_file(self, values: dict[str, Any], name: str = "values") -> Path:
        path = self.home / f"{name}.yaml"
        path.write_text(yaml.safe_dump(values))
        return path

    def template_text(
        self, values: dict[str, Any], release: str = "rlhf-operator", namespace: str = "rlhf-system", check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self(
            "template",
            release,
            str(CHART),
            "--namespace",
            namespace,
            "--kube-version",
            KUBE_VERSION,
            "-f",
            str(self.values_file(values)),
            check=check,
        )

    def template(
        self, values: dict[str, Any], release: str = "rlhf-operator", namespace: str = "rlhf-system"
    ) -> list[dict[str, Any]]:
        return [d for d in yaml.safe_load_all(self.template_text(values, release, namespace).stdout) if d]


def stop_quickly(plane: ControlPlane) -> None:
    """Stop a private, throwaway control plane at once: SIGKILL (its data directory is a temporary one,
    so a graceful shutdown, which can take ``ControlPlane.stop``'s whole 15 s grace, buys nothing)."""
    for proc in plane.processes:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    plane.stop()


def wait_established(plane: ControlPlane, crd: str = "rlhfruns.rlhf-operator.io", timeout: float = 60) -> None:
    """`kubectl wait --for=condition=Established`, retried: kubectl errors out instead of waiting
    while a just-created CRD has no status.conditions yet."""
    deadline = time.monotonic() + timeout
    while "condition met" not in plane.kubectl(
        "wait", "--for=condition=Established", "--timeout=30s", f"crd/{crd}", check=False
    ):
        assert time.monotonic() < deadline, f"CRD {crd} never became Established"
        time.sleep(0.5)


def value_sets(namespaces: tuple[str, str] = ("team-a", "team-b")) -> dict[str, dict[str, Any]]:
    """The value sets every render/lint/dry-run test goes through."""
    digest = "sha256:" + "0" * 63 + "1"
    return {
        "defaults": {},
        "scoped": {"watchNamespaces": list(namespaces), "crds": {"enabled": False}},
        "ha-monitored": {
            "replicaCount": 2,
            "image": {"tag": "0.1.0", "digest": digest},
            "stageDefaults": {
                "image": {"digest": digest},
                "storageClassName": "fast-rwo",
                "resources": {"cpu": "8", "memory": "64Gi"},
            },
            "metrics": {
                "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}, "scrapeTimeout": "10s"}
            },
            "commonLabels": {"team": "ml-platform"},
            "podAnnotations": {"example.com/owner": "ml-platform"},
            "podLabels": {"tier": "control"},
            "serviceAccount": {
                "annotations": {"iam.gke.io/gcp-service-account": "rlhf@example.iam.gserviceaccount.com"}
            },
            "imagePullSecrets": ["registry-creds"],
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "CriticalAddonsOnly", "operator": "Exists"}],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "nvidia.com/gpu.present", "operator": "DoesNotExist"}]}
                        ]
                    }
                }
            },
            "topologySpreadConstraints": [
                {
                    "maxSkew": 1,
                    "topologyKey": "kubernetes.io/hostname",
                    "whenUnsatisfiable": "ScheduleAnyway",
                    "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "rlhf-operator"}},
                }
            ],
            "priorityClassName": "system-cluster-critical",
            "operator": {"workers": 8, "resyncSeconds": 60, "progressIntervalSeconds": 5, "verbose": True},
            "runPolicy": {
                "allowedImagePrefixes": ["registry.example.com/ml/"],
                "allowedServiceAccounts": ["trainer", "team-a/hf-reader"],
                "allowedPriorityClasses": ["ml-training"],
                "allowedTolerationKeys": ["nvidia.com/gpu", ""],
                "validationActions": ["Warn", "Audit"],
            },
        },
        "bring-your-own": {
            "crds": {"keep": False},
            "rbac": {"create": False},
            "serviceAccount": {"create": False, "name": "existing-operator"},
            "leaderElection": {"enabled": False},
            "metrics": {"service": {"enabled": False}},
            "fullnameOverride": "rlhf",
            "runPolicy": {"enabled": False},
        },
    }


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


# --- JSON schemas for kubeconform, from the API server's OpenAPI v3 ------------------------------


def _convert(node: Any) -> Any:
    """OpenAPI v3 (as kube-apiserver publishes it) to plain JSON Schema, strict like kubeconform's
    own `-strict` schemas: objects with declared properties reject undeclared ones."""
    if isinstance(node, list):
        return [_convert(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "$ref":
            out[key] = value.replace("#/components/schemas/", "#/$defs/")
        elif key in ("properties", "patternProperties"):
            out[key] = {name: _convert(sub) for name, sub in value.items()}
        elif key in ("default", "example", "enum"):
            out[key] = value
        else:
            out[key] = _convert(value)
    if node.get("nullable") and isinstance(node.get("type"), str):
        out["type"] = [node["type"], "null"]
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _refs(node: Any, found: set[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            found.add(ref.rsplit("/", 1)[1])
        for value in node.values():
            _refs(value, found)
    elif isinstance(node, list):
        for value in node:
            _refs(value, found)


def schema_file_name(api_version: str, kind: str) -> str:
    """The name kubeconform's {{ .ResourceKind }}{{ .KindSuffix }} template gives a kind."""
    group, _, version = api_version.rpartition("/")
    suffix = f"-{group.split('.')[0]}-{version}" if group else f"-{version}"
    return f"{kind.lower()}{suffix}.json"


def write_schemas(plane: ControlPlane, out: Path, kinds: set[tuple[str, str]]) -> Path:
    """One standalone JSON schema per (apiVersion, kind), from the live server's OpenAPI v3."""
    out.mkdir(parents=True, exist_ok=True)
    index = json.loads(plane.kubectl("get", "--raw", "/openapi/v3"))["paths"]
    for api_version in sorted({a for a, _ in kinds}):
        path = f"apis/{api_version}" if "/" in api_version else f"api/{api_version}"
        doc = json.loads(plane.kubectl("get", "--raw", index[path]["serverRelativeURL"]))
        components = doc["components"]["schemas"]
        group, _, version = api_version.rpartition("/")
        for name, schema in components.items():
            for gvk in schema.get("x-kubernetes-group-version-kind", []):
                if (gvk["group"], gvk["version"]) != (group, version) or (api_version, gvk["kind"]) not in kinds:
                    continue
                needed, pending = {name}, [name]
                while pending:
                    found: set[str] = set()
                    _refs(components[pending.pop()], found)
                    pending += sorted(found - needed)
                    needed |= found
                standalone = {"$ref": f"#/$defs/{name}", "$defs": {n: _convert(components[n]) for n in sorted(needed)}}
                (out / schema_file_name(api_version, gvk["kind"])).write_text(json.dumps(standalone))
    return out


def kubeconform(schema_dir: Path, manifests: str, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        str(tools_dir() / "kubeconform"),
        "-strict",
        "-summary",
        "-output",
        "text",
        "-kubernetes-version",
        KUBE_VERSION,
        "-schema-location",
        f"{schema_dir}/{{{{ .ResourceKind }}}}{{{{ .KindSuffix }}}}.json",
        *extra,
        "-",
    ]
    return subprocess.run(cmd, check=False, input=manifests, capture_output=True, text=True, timeout=120)


def server_side_diff(plane: ControlPlane, manifest: str, field_manager: str) -> subprocess.CompletedProcess[str]:
    """`kubectl diff --server-side`: exit 0 when applying ``manifest`` would change nothing."""
    cmd = [
        str(plane.bin_dir / "kubectl"),
        "--kubeconfig",
        str(plane.kubeconfig()),
        "diff",
        "--server-side",
        f"--field-manager={field_manager}",
        "-f",
        "-",
    ]
    return subprocess.run(cmd, check=False, input=manifest, capture_output=True, text=True, timeout=120)


# --- Argo CD health check -------------------------------------------------------------------------

HEALTH_LUA = REPO / "examples" / "gitops" / "argocd" / "health.lua"


def argocd_health(obj: dict[str, Any], script: str | None = None) -> dict[str, str]:
    """Run the RLHFRun health check the way Argo CD does: Lua 5.1 (Argo CD embeds gopher-lua, a
    5.1 implementation), the live object as the global ``obj``, the chunk's return value the result."""
    from lupa import lua51

    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.eval("function(source) local chunk = assert(loadstring(source)); return chunk() end")(
        script if script is not None else HEALTH_LUA.read_text()
    )
    return {str(k): str(v) for k, v in dict(result).items()}
