"""The properties issue 19 asks of the rendered manifests, as a list of violations.

`violations(objs, overlay)` returns one line per broken rule (empty = all hold), so a test
can also show that each rule fires on a manifest that breaks it.
"""

from __future__ import annotations

from .manifests import (
    QUEUE_PREFIX,
    WORKLOAD_KINDS,
    Doc,
    config_map,
    env_of,
    find,
    pod_spec,
)

REDIS = "promptpix-redis"
REDIS_CLIENT_LABEL = "promptpix.io/redis-client"
API = "promptpix-api"
WEBHOOKS = "promptpix-webhooks"


def _name(d: Doc) -> str:
    return f"{d['kind']}/{d['metadata']['name']}"


def _containers(d: Doc) -> list[Doc]:
    spec = pod_spec(d)
    return spec.get("initContainers", []) + spec["containers"]


def security(objs: list[Doc]) -> list[str]:
    """Every container: non-root, read-only root fs, no privilege escalation, limits set."""
    out = []
    for d in (o for o in objs if o["kind"] in WORKLOAD_KINDS):
        pod_sc = pod_spec(d).get("securityContext", {})
        for c in _containers(d):
            sc = c.get("securityContext", {})
            where = f"{_name(d)} container {c['name']}"
            if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
                out.append(f"{where}: runAsNonRoot is not true")
            if (sc.get("runAsUser", pod_sc.get("runAsUser")) or 0) == 0:
                out.append(f"{where}: runAsUser is root or unset")
            if sc.get("readOnlyRootFilesystem") is not True:
                out.append(f"{where}: readOnlyRootFilesystem is not true")
            if sc.get("allowPrivilegeEscalation") is not False:
                out.append(f"{where}: allowPrivilegeEscalation is not false")
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                missing = {"cpu", "memory"} - set(res.get(kind, {}))
                if missing:
                    out.append(f"{where}: no {kind} for {sorted(missing)}")
    return out


def redis_private(objs: list[Doc]) -> list[str]:
    """Redis: ClusterIP only, no Ingress to it, and a NetworkPolicy admitting only the
    labelled clients (API, workers, webhooks) and KEDA; AOF on, noeviction, password."""
    out = []
    for svc in find(objs, "Service"):
        if svc["spec"].get("selector", {}).get("app.kubernetes.io/name") == REDIS:
            if svc["spec"].get("type", "ClusterIP") != "ClusterIP":
                out.append(f"{_name(svc)}: type {svc['spec']['type']}, expected ClusterIP")
            if any("nodePort" in p for p in svc["spec"].get("ports", [])):
                out.append(f"{_name(svc)}: has a nodePort")
            redis_service = svc["metadata"]["name"]
            for ing in find(objs, "Ingress"):
                for rule in ing["spec"].get("rules", []):
                    for path in rule.get("http", {}).get("paths", []):
                        if path["backend"].get("service", {}).get("name") == redis_service:
                            out.append(f"{_name(ing)}: routes to Redis")
    policies = [p for p in find(objs, "NetworkPolicy")
                if p["spec"]["podSelector"].get("matchLabels", {}).get(
                    "app.kubernetes.io/name") == REDIS]
    if len(policies) != 1:
        out.append(f"expected one NetworkPolicy selecting Redis, found {len(policies)}")
    for pol in policies:
        if "Ingress" not in pol["spec"].get("policyTypes", []):
            out.append(f"{_name(pol)}: does not restrict Ingress")
        for rule in pol["spec"].get("ingress", []):
            peers = rule.get("from")
            if not peers:
                out.append(f"{_name(pol)}: a rule admits every source")
                continue
            for peer in peers:
                ns = peer.get("namespaceSelector")
                pods = peer.get("podSelector", {}).get("matchLabels", {})
                if "ipBlock" in peer:
                    out.append(f"{_name(pol)}: admits an ipBlock")
                elif ns is None and pods != {REDIS_CLIENT_LABEL: "true"}:
                    out.append(f"{_name(pol)}: admits pods {pods}, expected the client label")
                elif ns is not None and (
                        ns.get("matchLabels", {}) != {"kubernetes.io/metadata.name": "keda"}
                        or pods != {"app.kubernetes.io/name": "keda-operator"}):
                    out.append(f"{_name(pol)}: admits pods {pods} of namespaces {ns}, "
                               "expected KEDA's operator only")
    if not any(p["spec"]["podSelector"] in ({}, {"matchLabels": {}})
               for p in find(objs, "NetworkPolicy")):
        out.append("no default-deny NetworkPolicy")
    clients = {d["metadata"]["name"] for d in objs if d["kind"] in WORKLOAD_KINDS
               and d["spec"]["template"]["metadata"].get("labels", {}).get(
                   REDIS_CLIENT_LABEL) == "true"}
    expected = {API, WEBHOOKS} | {w["metadata"]["name"] for w in workers(objs)}
    if clients != expected:
        out.append(f"Redis clients are {sorted(clients)}, expected {sorted(expected)}")
    for sts in find(objs, "StatefulSet", REDIS):
        if not sts["spec"].get("volumeClaimTemplates"):
            out.append(f"{_name(sts)}: no persistent volume")
        c = pod_spec(sts)["containers"][0]
        refs = [e for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
        if "--requirepass" not in c.get("command", []) + c.get("args", []) or not refs:
            out.append(f"{_name(sts)}: no password from a Secret")
    confs = [cm["data"]["redis.conf"] for cm in find(objs, "ConfigMap")
             if "redis.conf" in cm.get("data", {})]
    for line in ("appendonly yes", "maxmemory-policy noeviction"):
        if not confs or line not in confs[0].splitlines():
            out.append(f"redis.conf lacks {line!r}")
    return out


def workers(objs: list[Doc]) -> list[Doc]:
    return [d for d in find(objs, "Deployment")
            if d["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"]


def probes_and_api(objs: list[Doc]) -> list[str]:
    """API: 2+ replicas, readiness /readyz?scope=api, liveness /healthz, a PDB. Every
    long-running container has a readiness probe; workers a liveness or startup probe."""
    out = []
    apis = find(objs, "Deployment", API)
    if len(apis) != 1:
        return [f"expected one Deployment {API}, found {len(apis)}"]
    api = apis[0]
    if api["spec"].get("replicas", 1) < 2:
        out.append(f"{_name(api)}: fewer than 2 replicas")
    c = pod_spec(api)["containers"][0]
    if c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz?scope=api":
        out.append(f"{_name(api)}: readiness probe is not GET /readyz?scope=api")
    if c.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/healthz":
        out.append(f"{_name(api)}: liveness probe is not GET /healthz")
    labels = api["spec"]["template"]["metadata"]["labels"]
    if not any(all(labels.get(k) == v for k, v in
                   pdb["spec"]["selector"].get("matchLabels", {}).items())
               for pdb in find(objs, "PodDisruptionBudget")):
        out.append(f"{_name(api)}: no PodDisruptionBudget selects it")
    for d in find(objs, "Deployment") + find(objs, "StatefulSet"):
        for ctr in pod_spec(d)["containers"]:
            if "readinessProbe" not in ctr:
                out.append(f"{_name(d)} container {ctr['name']}: no readiness probe")
    for w in workers(objs):
        ctr = pod_spec(w)["containers"][0]
        if "livenessProbe" not in ctr:
            out.append(f"{_name(w)}: no liveness probe")
    return out


def worker_rules(objs: list[Doc], overlay: str) -> list[str]:
    """Workers: one per declared model, checkpoint from a read-only volume, grace above
    PROMPTPIX_SHUTDOWN_GRACE, a GPU each in the gpu overlay (none in cpu), and one
    ScaledObject each whose Redis list is that model's queue."""
    out = []
    config = config_map(objs)
    grace = float(config.get("PROMPTPIX_SHUTDOWN_GRACE", 30))
    declared = {m.strip() for m in config.get("PROMPTPIX_MODELS", "").split(",") if m.strip()}
    served = set()
    if not workers(objs):
        out.append("no worker Deployment")
    for w in workers(objs):
        spec = pod_spec(w)
        ctr = spec["containers"][0]
        env = env_of(ctr, config)
        model = env.get("PROMPTPIX_MODEL_NAME")
        served.add(model)
        if spec.get("terminationGracePeriodSeconds", 30) <= grace:
            out.append(f"{_name(w)}: terminationGracePeriodSeconds "
                       f"{spec.get('terminationGracePeriodSeconds', 30)} <= "
                       f"PROMPTPIX_SHUTDOWN_GRACE {grace}")
        ckpt = env.get("PROMPTPIX_CHECKPOINT", "")
        mounts = [m for m in ctr.get("volumeMounts", []) if ckpt.startswith(m["mountPath"] + "/")]
        if not mounts or not all(m.get("readOnly") for m in mounts):
            out.append(f"{_name(w)}: checkpoint {ckpt!r} is not on a read-only volume mount")
        gpus = {k: ctr.get("resources", {}).get(k, {}).get("nvidia.com/gpu")
                for k in ("requests", "limits")}
        if overlay == "gpu" and str(gpus["limits"]) != "1":
            out.append(f"{_name(w)}: nvidia.com/gpu limit is {gpus['limits']}, expected 1")
        if overlay != "gpu" and any(v is not None for v in gpus.values()):
            out.append(f"{_name(w)}: asks for a GPU in the {overlay} overlay")
        scaled = [s for s in find(objs, "ScaledObject")
                  if s["spec"]["scaleTargetRef"]["name"] == w["metadata"]["name"]]
        if len(scaled) != 1:
            out.append(f"{_name(w)}: {len(scaled)} ScaledObjects target it, expected 1")
            continue
        for trig in scaled[0]["spec"]["triggers"]:
            lists = trig["metadata"].get("listName")
            if trig["type"] == "redis" and lists != QUEUE_PREFIX + str(model):
                out.append(f"{_name(scaled[0])}: listName {lists!r}, expected the queue of "
                           f"model {model!r}: {QUEUE_PREFIX}{model}")
    if declared != served:
        out.append(f"PROMPTPIX_MODELS declares {sorted(declared)}, workers serve "
                   f"{sorted(map(str, served))}")
    return out


def scrape(objs: list[Doc]) -> list[str]:
    """The API and the workers carry Prometheus scrape annotations on their pods."""
    out = []
    for d in find(objs, "Deployment", API) + workers(objs):
        ann = d["spec"]["template"]["metadata"].get("annotations", {})
        if ann.get("prometheus.io/scrape") != "true" or "prometheus.io/port" not in ann:
            out.append(f"{_name(d)}: no Prometheus scrape annotations")
    return out


def violations(objs: list[Doc], overlay: str) -> list[str]:
    """Every broken rule of a rendered overlay."""
    return (security(objs) + redis_private(objs) + probes_and_api(objs)
            + worker_rules(objs, overlay) + scrape(objs))
