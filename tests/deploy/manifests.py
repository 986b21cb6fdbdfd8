"""Rendering and reading the Kubernetes manifests of deploy/kubernetes (no cluster needed).

kubectl comes from Debian's `kubernetes-client` (`make kubectl` installs it; its built-in
kustomize is v2.0.3, the oldest the manifests must render with) or PROMPTPIX_KUBECTL;
checkov from the `deploy` extra in its own venv, .venv/deploy (`make deploy-tools`: it pins
packages the dev extra needs newer), or PROMPTPIX_CHECKOV, or PATH.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu")
TRAINING = sorted((KUBE / "training").glob("*.yaml"))
SCHEMAS = KUBE / "schemas"
QUEUE_PREFIX = "rq:queue:generate:"  # API.md, Round 2: Queues
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job", "DaemonSet")

Doc = dict[str, Any]


def kubectl() -> str | None:
    """The kubectl to render with: $PROMPTPIX_KUBECTL, else the one on PATH."""
    return os.environ.get("PROMPTPIX_KUBECTL") or shutil.which("kubectl")


def checkov() -> str | None:
    """checkov: $PROMPTPIX_CHECKOV, the Makefile's .venv/deploy, else PATH."""
    local = ROOT / ".venv" / "deploy" / "bin" / "checkov"
    return os.environ.get("PROMPTPIX_CHECKOV") or (
        str(local) if local.exists() else shutil.which("checkov"))


@lru_cache
def render(overlay: str) -> str:
    """`kubectl kustomize` of an overlay, as YAML text."""
    exe = kubectl()
    if exe is None:
        raise FileNotFoundError("kubectl")
    done = subprocess.run([exe, "kustomize", str(KUBE / "overlays" / overlay)],
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise AssertionError(f"kubectl kustomize overlays/{overlay} failed: {done.stderr}")
    return done.stdout


def docs(overlay: str) -> list[Doc]:
    """The rendered overlay's objects (a fresh copy: tests may mutate it)."""
    return [d for d in yaml.safe_load_all(render(overlay)) if d]


def training_docs() -> list[Doc]:
    """The training manifests (applied one by one, not through kustomize)."""
    return [d for p in TRAINING for d in yaml.safe_load_all(p.read_text()) if d]


def find(objs: list[Doc], kind: str, name: str | None = None) -> list[Doc]:
    return [d for d in objs if d["kind"] == kind
            and (name is None or d["metadata"]["name"] == name)]


def one(objs: list[Doc], kind: str, name: str) -> Doc:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
    return found[0]


def pod_spec(obj: Doc) -> Doc:
    """The pod template's spec of a workload."""
    return obj["spec"]["template"]["spec"]


def env_of(container: Doc, config: dict[str, str]) -> dict[str, str]:
    """A container's literal environment: its ConfigMap (envFrom) under its own `env`."""
    out = dict(config) if container.get("envFrom") else {}
    for e in container.get("env", []):
        out[e["name"]] = e.get("value", "<from " + ",".join(e.get("valueFrom", {})) + ">")
    return out


def config_map(objs: list[Doc]) -> dict[str, str]:
    """The data of the generated promptpix-config ConfigMap (its name has a hash suffix)."""
    found = [d for d in objs if d["kind"] == "ConfigMap"
             and d["metadata"]["name"].startswith("promptpix-config-")]
    assert len(found) == 1, f"expected one promptpix-config-<hash>, found {len(found)}"
    return found[0]["data"]


def crd_schema(name: str) -> Doc:
    """A vendored CRD schema, closed like `kubectl --validate=strict` (schemas/README.md)."""
    schema = yaml.safe_load((SCHEMAS / name).read_text())["openAPIV3Schema"]
    return close_schema(schema)


def close_schema(schema: Doc) -> Doc:
    """Forbid unknown fields wherever the schema lists `properties` and does not say that
    unknown fields are kept (the API server would prune them silently)."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def render_text(obj: Doc) -> str:
    return yaml.safe_dump(obj, sort_keys=False)
