"""deploy/kubernetes, validated offline: every overlay as `kubectl kustomize` renders it
against the Kubernetes schemas bundled by kubernetes-validate, the custom resources against
their projects' published schemas (vendored, deploy/kubernetes/schemas/README.md), checkov
with no failed check, and the invariants of issue 19 (tests/deploy/invariants.py)."""

from __future__ import annotations

import copy
import json
import subprocess
import tempfile
from pathlib import Path

import jsonschema
import pytest
import yaml

from . import invariants
from .manifests import (
    KUBE,
    OVERLAYS,
    TRAINING,
    Doc,
    checkov,
    config_map,
    crd_schema,
    docs,
    find,
    kubectl,
    one,
    pod_spec,
    render,
    training_docs,
)

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed (pip install -e '.[dev]')")

# The oldest Kubernetes the manifests target (policy/v1 PDB, batch/v1 Indexed Job with the
# completion-index annotation, KEDA 2.16's floor is older) and the newest bundled.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CRDS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobject_v1alpha1.yaml",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda.sh_triggerauthentication_v1alpha1.yaml",
    ("kubeflow.org/v1", "PyTorchJob"): "kubeflow.org_pytorchjob_v1.yaml",
}

needs_kubectl = pytest.mark.skipif(
    kubectl() is None,
    reason="kubectl not found: `make kubectl` installs Debian's kubernetes-client "
           "(or set PROMPTPIX_KUBECTL)")


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return request.param


def validate(obj: Doc) -> None:
    """One object: built-in kinds against kubernetes-validate (strict: unknown fields fail),
    custom resources against their vendored schema, closed the same way."""
    key = (obj["apiVersion"], obj["kind"])
    where = f"{obj['kind']}/{obj['metadata']['name']}"
    if key in CRDS:
        errors = sorted(jsonschema.Draft7Validator(crd_schema(CRDS[key])).iter_errors(obj),
                        key=str)
        assert not errors, f"{where}: " + "; ".join(
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
        if obj["kind"] == "PyTorchJob":  # the pod templates, as the CRD embeds them
            for role, spec in obj["spec"]["pytorchReplicaSpecs"].items():
                validate({"apiVersion": "v1", "kind": "PodTemplate",
                          "metadata": {"name": f"{obj['metadata']['name']}-{role}"},
                          "template": spec["template"]})
        return
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{where} is not valid Kubernetes {version}: {e.message} "
                                 f"at {'/'.join(map(str, e.path))}") from None


def test_kustomizations_stay_within_kustomize_v2_0_3() -> None:
    """kubectl 1.20's kustomize (v2.0.3) has no `patches` and no `components`."""
    for k in KUBE.rglob("kustomization.yaml"):
        keys = set(yaml.safe_load(k.read_text()))
        assert not keys & {"patches", "components", "replacements", "labels", "helmCharts"}, (
            f"{k.relative_to(KUBE)} uses {sorted(keys & {'patches', 'components'})}, which "
            "kubectl 1.20 cannot render: use patchesStrategicMerge / patchesJson6902")


@needs_kubectl
def test_overlay_validates(overlay: str) -> None:
    objs = docs(overlay)
    kinds = {d["kind"] for d in objs}
    assert {"Deployment", "StatefulSet", "ScaledObject", "NetworkPolicy", "Ingress",
            "PodDisruptionBudget"} <= kinds, f"overlays/{overlay} renders only {sorted(kinds)}"
    for obj in objs:
        validate(obj)
        assert obj["metadata"].get("namespace", "promptpix") == "promptpix" or (
            obj["kind"] == "Namespace"), f"{obj['kind']}/{obj['metadata']['name']} namespace"


def test_training_manifests_validate() -> None:
    objs = training_docs()
    assert {d["kind"] for d in objs} == {"PersistentVolumeClaim", "PyTorchJob", "Service", "Job"}
    for obj in objs:
        validate(obj)


def test_training_writes_where_workers_read() -> None:
    """Training jobs write checkpoints to the volume the workers mount read-only."""
    base = [d for p in (KUBE / "base").glob("*.yaml") for d in yaml.safe_load_all(p.read_text())
            if d]
    worker = one(base, "Deployment", "promptpix-worker-shapes16")
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in pod_spec(worker)["volumes"] if "persistentVolumeClaim" in v}
    for job in training_docs():
        if job["kind"] == "PyTorchJob":
            templates = [s["template"] for s in job["spec"]["pytorchReplicaSpecs"].values()]
        elif job["kind"] == "Job":
            templates = [job["spec"]["template"]]
        else:
            continue
        for t in templates:
            ctr = t["spec"]["containers"][0]
            tclaims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                       for v in t["spec"]["volumes"] if "persistentVolumeClaim" in v}
            ckpt_dir = next(a.split("=", 1)[1] for a in ctr["args"]
                            if a.startswith("--checkpoint_dir="))
            mount = next(m for m in ctr["volumeMounts"]
                         if ckpt_dir.startswith(m["mountPath"] + "/"))
            assert not mount.get("readOnly")
            assert tclaims[mount["name"]] == claims["checkpoints"], (
                f"{job['kind']} writes {ckpt_dir} to claim {tclaims[mount['name']]}, "
                f"workers read claim {claims['checkpoints']}")


@needs_kubectl
def test_invariants_hold(overlay: str) -> None:
    assert invariants.violations(docs(overlay), overlay) == []


@needs_kubectl
def test_gpu_overlay_scales_to_zero_and_cpu_keeps_one() -> None:
    gpu = one(docs("gpu"), "ScaledObject", "promptpix-worker-shapes16")["spec"]
    cpu = one(docs("cpu"), "ScaledObject", "promptpix-worker-shapes16")["spec"]
    assert (gpu["minReplicaCount"], cpu["minReplicaCount"]) == (0, 1)
    assert config_map(docs("gpu"))["PROMPTPIX_DEVICE"] == "cuda"
    assert config_map(docs("cpu"))["PROMPTPIX_DEVICE"] == "cpu"


def _broken(objs: list[Doc], edit: str) -> list[Doc]:
    objs = copy.deepcopy(objs)
    worker = next(d for d in objs if d["metadata"]["name"] == "promptpix-worker-shapes16"
                  and d["kind"] == "Deployment")
    ctr = pod_spec(worker)["containers"][0]
    if edit == "listName":
        so = find(objs, "ScaledObject")[0]
        so["spec"]["triggers"][0]["metadata"]["listName"] = "rq:queue:generate"
    elif edit == "root":
        pod_spec(worker)["securityContext"]["runAsNonRoot"] = False
    elif edit == "limits":
        del ctr["resources"]["limits"]
    elif edit == "redis-exposed":
        svc = one(objs, "Service", "promptpix-redis")
        svc["spec"]["type"] = "LoadBalancer"
    elif edit == "probe":
        api = one(objs, "Deployment", "promptpix-api")
        pod_spec(api)["containers"][0]["readinessProbe"]["httpGet"]["path"] = "/readyz"
    elif edit == "gpu":
        del ctr["resources"]["limits"]["nvidia.com/gpu"]
    elif edit == "grace":
        pod_spec(worker)["terminationGracePeriodSeconds"] = 30
    elif edit == "netpol":
        pol = one(objs, "NetworkPolicy", "promptpix-redis")
        pol["spec"]["ingress"][0]["from"].append({"namespaceSelector": {}})
    return objs


@needs_kubectl
@pytest.mark.parametrize("edit", ["listName", "root", "limits", "redis-exposed", "probe", "gpu",
                                  "grace", "netpol"])
def test_invariants_catch_a_break(edit: str) -> None:
    """Each rule fires on a manifest that breaks it (the checker is not vacuous)."""
    found = invariants.violations(_broken(docs("gpu"), edit), "gpu")
    assert found, f"breaking {edit!r} went unnoticed"


def test_crd_schemas_catch_a_typo() -> None:
    """A misspelt ScaledObject field fails (the API server would drop it silently)."""
    so = next(d for d in yaml.safe_load_all((KUBE / "base" / "scaledobject-shapes16.yaml")
                                            .read_text()) if d["kind"] == "ScaledObject")
    validate(so)
    so["spec"]["minReplicas"] = so["spec"].pop("minReplicaCount")
    with pytest.raises(AssertionError, match="minReplicas"):
        validate(so)


@needs_kubectl
@pytest.mark.skipif(checkov() is None,
                    reason="checkov not found: `make deploy-tools` installs it into "
                           ".venv/deploy (or set PROMPTPIX_CHECKOV)")
def test_checkov_reports_no_failed_check() -> None:
    """checkov's Kubernetes checks over both overlays and the training jobs; every skip is
    an annotation on the object with its reason (`checkov.io/skipN: CHECK=reason`)."""
    with tempfile.TemporaryDirectory() as tmp:
        for name in OVERLAYS:
            (Path(tmp) / f"overlay-{name}.yaml").write_text(render(name))
        for p in TRAINING:
            (Path(tmp) / f"training-{p.name}").write_text(p.read_text())
        done = subprocess.run(
            [str(checkov()), "--skip-download", "--framework", "kubernetes", "-d", tmp,
             "-o", "json"], capture_output=True, text=True, timeout=300)
    report = json.loads(done.stdout)
    report = report if isinstance(report, list) else [report]
    failed = [f"{c['check_id']} {c['resource']} ({c['check_name']})"
              for r in report for c in r["results"]["failed_checks"]]
    assert failed == [], "checkov failed checks:\n" + "\n".join(failed)
    skipped = [c for r in report for c in r["results"]["skipped_checks"]]
    assert all(c.get("check_result", {}).get("suppress_comment") for c in skipped), (
        "a checkov skip without a reason")
    assert not [e for r in report for e in r["results"]["parsing_errors"]], "checkov parse errors"
    passed = sum(r["summary"]["passed"] for r in report)
    assert passed > 100, f"checkov passed only {passed} checks: did it read the manifests?"
