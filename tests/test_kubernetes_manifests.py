"""deploy/kubernetes/: the manifests validate offline against the Kubernetes schemas, and say what users rely on.

Built-in kinds are checked by kubernetes-validate (its JSON schemas ship in the wheel: no network), strict, so
an unknown or misspelt field fails. Custom resources it has no schema for (ServiceMonitor, ScaledObject) are
checked against the subset of their CRDs written below. Every kustomization is rendered with
`kubectl kustomize` (kubectl ships kustomize) where kubectl is installed, and the result validated too. The
commands are those of docker-compose.yml, and every module they name exists.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "deploy" / "kubernetes"
BASE = KUBE / "base"
COMPOSE = ROOT / "docker-compose.yml"
# the oldest Kubernetes release still widely run, and the newest the validator knows
VERSIONS = ("1.28", kubernetes_validate.utils.latest_version())
IMAGE = "pagedfleet"  # the image name the base uses for every PagedFleet container (overlays retag it)
PYTHON_SERVICES = {"gateway": "gateway", "scheduler": "scheduler", "gpu_worker": "gpu-worker",
                   "celery_worker": "celery-worker", "celery_beat": "celery-beat",
                   "batch_worker": "batch-worker"}  # compose name -> Deployment
INTERNAL_PORTS = {"redis": 6379, "scheduler": 8001, "gpu-worker": 8002}

_DURATION = {"type": "string", "pattern": r"^(0|([0-9]+(ms|s|m|h|d|w|y))+)$"}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {"type": "object", "required": ["name"],
             "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                            "namespace": {"type": "string"}, "labels": _LABELS, "annotations": _LABELS}}
# The subsets of the monitoring.coreos.com/v1 and keda.sh/v1alpha1 CRDs these manifests use: required fields as
# the CRDs require them, and no field outside the subset (a typo fails; a new field is added here from the CRD).
CUSTOM_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
            "metadata": _METADATA,
            "spec": {
                "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
                "properties": {
                    "selector": {"type": "object", "additionalProperties": False, "minProperties": 1,
                                 "properties": {"matchLabels": _LABELS, "matchExpressions": {"type": "array"}}},
                    "namespaceSelector": {"type": "object"},
                    "jobLabel": {"type": "string"},
                    "endpoints": {
                        "type": "array", "minItems": 1,
                        "items": {"type": "object", "additionalProperties": False,
                                  "anyOf": [{"required": ["port"]}, {"required": ["targetPort"]}],
                                  "properties": {"port": {"type": "string"},
                                                 "targetPort": {"type": ["string", "integer"]},
                                                 "path": {"type": "string", "pattern": "^/"},
                                                 "scheme": {"enum": ["http", "https"]},
                                                 "interval": _DURATION, "scrapeTimeout": _DURATION,
                                                 "honorLabels": {"type": "boolean"}}}},
                }},
        }},
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "ScaledObject"},
            "metadata": _METADATA,
            "spec": {
                "type": "object", "required": ["scaleTargetRef", "triggers"], "additionalProperties": False,
                "properties": {
                    "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                       "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                                      "name": {"type": "string"},
                                                      "envSourceContainerName": {"type": "string"}}},
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "pollingInterval": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": {"type": "integer", "minimum": 0},
                    "advanced": {"type": "object", "additionalProperties": False,
                                 "properties": {"restoreToOriginalReplicaCount": {"type": "boolean"},
                                                "horizontalPodAutoscalerConfig": {
                                                    "type": "object", "additionalProperties": False,
                                                    "properties": {"name": {"type": "string"},
                                                                   "behavior": {"type": "object"}}}}},
                    "triggers": {
                        "type": "array", "minItems": 1,
                        "items": {"type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                                  "properties": {"type": {"type": "string"}, "name": {"type": "string"},
                                                 "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                                 # KEDA reads trigger metadata as a map of strings
                                                 "metadata": {"type": "object",
                                                              "additionalProperties": {"type": "string"}}}}},
                }},
        }},
}
# what KEDA's prometheus scaler needs in its metadata
PROMETHEUS_TRIGGER_KEYS = {"serverAddress", "query", "threshold"}


# ------------------------------------------------------------------------------------------------
# loading


def _load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kustomizations() -> list[Path]:
    return sorted(KUBE.rglob("kustomization.yaml"))


def _local_entries(kust: dict, key: str) -> list[str]:
    entries = [e if isinstance(e, str) else e.get("path") for e in kust.get(key) or []]
    return [e for e in entries if e and not e.startswith("..")]


def _resource_files() -> list[Path]:
    """Every file a kustomization lists as a resource: whole manifests, validated one by one."""
    out = []
    for k in _kustomizations():
        out += [k.parent / r for r in _local_entries(yaml.safe_load(k.read_text()), "resources")]
    return sorted(out)


def _docs(folder: Path = BASE) -> list[dict]:
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    return [d for r in _local_entries(kust, "resources") for d in _load(folder / r)]


def _find(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _containers(doc: dict) -> list[dict]:
    return doc["spec"]["template"]["spec"]["containers"]


def _workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def _validate(doc: dict, version: str) -> None:
    key = (doc["apiVersion"], doc["kind"])
    if key in CUSTOM_SCHEMAS:
        jsonschema.Draft202012Validator(CUSTOM_SCHEMAS[key]).validate(doc)
        return
    # SchemaNotFoundError for a kind it does not know: an unknown kind fails rather than passing unchecked
    kubernetes_validate.validate(doc, version, strict=True)


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return _docs(BASE)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


# ------------------------------------------------------------------------------------------------
# the files and the schemas


def test_every_kustomization_lists_every_file_of_its_folder():
    assert (BASE / "kustomization.yaml").exists()
    for k in _kustomizations():
        kust = yaml.safe_load(k.read_text())
        assert kust["kind"] in ("Kustomization", "Component"), k
        listed = set(_local_entries(kust, "resources")) | set(_local_entries(kust, "patches"))
        on_disk = {p.name for p in k.parent.iterdir() if p.suffix in (".yaml", ".yml")} - {k.name}
        assert listed == on_disk, f"{k.relative_to(ROOT)}: lists {sorted(listed)}, folder has {sorted(on_disk)}"
        for ref in (kust.get("resources") or []) + (kust.get("components") or []):
            assert (k.parent / ref).exists(), f"{k.relative_to(ROOT)}: {ref} does not exist"


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(version):
    files = _resource_files()
    assert len(files) >= 10
    for path in files:
        for doc in _load(path):
            try:
                _validate(doc, version)
            except (jsonschema.ValidationError, kubernetes_validate.utils.SchemaNotFoundError) as e:
                where = "/".join(map(str, getattr(e, "path", [])))
                pytest.fail(f"{path.relative_to(ROOT)} {doc['kind']}/{doc['metadata']['name']} (k8s {version}): "
                            f"{where}: {getattr(e, 'message', e)}")


def test_a_broken_manifest_fails_validation(base):
    """The validators are not vacuous: a misspelt field, a wrong type, a missing required field fail."""
    gateway = _find(base, "Deployment", "gateway")
    broken = copy.deepcopy(gateway)
    broken["spec"]["replica"] = 2
    with pytest.raises(jsonschema.ValidationError):
        _validate(broken, VERSIONS[-1])
    broken = copy.deepcopy(gateway)
    _containers(broken)[0]["ports"][0]["containerPort"] = "8000"
    with pytest.raises(jsonschema.ValidationError):
        _validate(broken, VERSIONS[-1])
    keda = _docs(KUBE / "components" / "keda")
    scaled = _find(keda, "ScaledObject", "gpu-worker")
    for mutate in (lambda d: d["spec"].pop("scaleTargetRef"), lambda d: d["spec"].update(triggers=[]),
                   lambda d: d["spec"]["triggers"][0]["metadata"].update(threshold=1),
                   lambda d: d["spec"].update(minReplicas=1)):
        broken = copy.deepcopy(scaled)
        mutate(broken)
        with pytest.raises(jsonschema.ValidationError):
            _validate(broken, VERSIONS[-1])
    monitor = _docs(KUBE / "components" / "prometheus-operator")[0]
    for mutate in (lambda d: d["spec"].pop("endpoints"), lambda d: d["spec"]["endpoints"][0].pop("port"),
                   lambda d: d["spec"]["endpoints"][0].update(interval="5 seconds")):
        broken = copy.deepcopy(monitor)
        mutate(broken)
        with pytest.raises(jsonschema.ValidationError):
            _validate(broken, VERSIONS[-1])
    with pytest.raises(kubernetes_validate.utils.SchemaNotFoundError):
        _validate({"apiVersion": "example.com/v1", "kind": "Unknown", "metadata": {"name": "x"}}, VERSIONS[-1])


def _kustomize(folder: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its kustomize) is not installed")
    out = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.parametrize("folder", ["base", "overlays/example", "overlays/external-redis"])
def test_every_kustomization_renders_and_validates(folder):
    docs = _kustomize(KUBE / folder)
    for doc in docs:
        _validate(doc, VERSIONS[-1])
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("Deployment", "gateway"), ("Deployment", "scheduler"), ("Deployment", "gpu-worker"),
            ("Deployment", "celery-worker"), ("Deployment", "celery-beat")} <= kinds
    if folder == "overlays/example":
        assert {("ScaledObject", "gpu-worker"), ("ServiceMonitor", "pagedfleet-scheduler")} <= kinds
        assert all(d["metadata"].get("namespace") == "pagedfleet" for d in docs if d["kind"] != "Namespace")
        # KEDA owns the worker count: the Deployment leaves replicas unset, so an apply does not reset it
        assert "replicas" not in _find(docs, "Deployment", "gpu-worker")["spec"]
        images = {c["image"] for d in _workloads(docs) for c in _containers(d) if c["image"] != "redis:7.4-alpine"}
        assert images == {"registry.example.com/pagedfleet:0.1.0"}
    if folder == "overlays/external-redis":
        assert ("StatefulSet", "redis") not in kinds and ("Service", "redis") not in kinds
        url = _find(docs, "Secret", "pagedfleet-redis")["stringData"]["REDIS_URL"]
        assert "@redis:" not in url and url.startswith(("redis://", "rediss://"))


# ------------------------------------------------------------------------------------------------
# what users rely on


def _module_file(module: str) -> Path:
    path = ROOT / Path(*module.split("."))
    return path / "__main__.py" if path.is_dir() else path.with_suffix(".py")


def test_containers_run_the_services_of_the_compose_file(base, compose):
    services = compose["services"]
    for compose_name, deployment in PYTHON_SERVICES.items():
        container = _containers(_find(base, "Deployment", deployment))[0]
        assert container["image"] == IMAGE, deployment
        # the same command and flags as docker-compose.yml runs
        assert container["command"] == services[compose_name]["command"], deployment
    for doc in _workloads(base):
        for c in _containers(doc):
            cmd = c.get("command") or []
            if c["image"] != IMAGE:
                continue
            if cmd[:2] == ["python", "-m"]:
                assert cmd[2] in ("gateway.app", "scheduler.service", "gpu_worker.service"), cmd
                assert _module_file(cmd[2]).exists(), cmd
            else:
                assert cmd[:2] == ["celery", "-A"] and _module_file(cmd[2]).exists(), cmd
    # Redis: the compose image and persistence flags, plus the password
    redis = _containers(_find(base, "StatefulSet", "redis"))[0]
    assert redis["image"] == services["redis"]["image"]
    assert redis["args"][:len(services["redis"]["command"])] == services["redis"]["command"]
    assert redis["args"][-2:] == ["--requirepass", "$(REDIS_PASSWORD)"]


def test_every_reference_resolves(base):
    config = _find(base, "ConfigMap", "pagedfleet-config")
    secrets = {d["metadata"]["name"]: d.get("stringData", {}) | d.get("data", {})
               for d in base if d["kind"] == "Secret"}
    for doc in _workloads(base):
        for c in _containers(doc):
            for src in c.get("envFrom", []):
                assert src["configMapRef"]["name"] == config["metadata"]["name"]
            for var in c.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]], (doc["metadata"]["name"], var["name"])
            names = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                action = c.get(probe, {}).get("httpGet") or c.get(probe, {}).get("tcpSocket")
                if action:
                    assert action["port"] in names or action["port"] in names.values(), (c["name"], probe)
        annotations = doc["spec"]["template"]["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") == "true":
            ports = {p["containerPort"] for c in _containers(doc) for p in c.get("ports", [])}
            assert int(annotations["prometheus.io/port"]) in ports and annotations["prometheus.io/path"] == "/metrics"
    # every Service selects a workload's pods, on a port its container has
    for svc in (d for d in base if d["kind"] == "Service"):
        selected = [w for w in _workloads(base)
                    if svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(selected) == 1, svc["metadata"]["name"]
        port_names = {p["name"] for c in _containers(selected[0]) for p in c.get("ports", [])}
        assert all(p["targetPort"] in port_names for p in svc["spec"]["ports"]), svc["metadata"]["name"]
    for w in _workloads(base):
        assert w["spec"]["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items()


def test_the_config_map_holds_the_compose_settings(base, compose):
    """The PAGEDFLEET_* environment of the compose file; the Redis URL only in the Secret."""
    data = _find(base, "ConfigMap", "pagedfleet-config")["data"]
    compose_env = set(compose["x-pagedfleet"]["environment"]) | set(compose["services"]["gpu_worker"]["environment"])
    assert set(data) <= compose_env and all(k.startswith("PAGEDFLEET_") for k in data)
    assert not any("REDIS" in k for k in data)
    assert all(isinstance(v, str) for v in data.values())
    assert data["PAGEDFLEET_SCHEDULER_URL"] == "http://scheduler:8001"


def test_redis_persists_its_append_only_file(base):
    redis = _find(base, "StatefulSet", "redis")
    claim = redis["spec"]["volumeClaimTemplates"][0]
    mounts = {m["name"]: m["mountPath"] for m in _containers(redis)[0]["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/data"
    assert "--appendonly" in _containers(redis)[0]["args"]
    assert _find(base, "Service", "redis")["spec"]["ports"][0]["port"] == 6379


def test_gateway_replicas_behind_a_service_with_health_probes(base):
    gateway = _find(base, "Deployment", "gateway")
    assert gateway["spec"]["replicas"] >= 2
    c = _containers(gateway)[0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "livenessProbe" in c
    assert {"REDIS_URL", "PAGEDFLEET_REDIS_URL"} <= {v["name"] for v in c["env"] if "secretKeyRef" in v["valueFrom"]}
    assert _find(base, "Service", "gateway")["spec"]["ports"][0]["port"] == 8000


def test_scheduler_runs_active_and_standby(base):
    scheduler = _find(base, "Deployment", "scheduler")
    assert scheduler["spec"]["replicas"] == 2
    # a rolling update would wait forever for the standby (never Ready: it serves no HTTP until it leads)
    assert scheduler["spec"]["strategy"]["type"] == "Recreate"
    cmd = _containers(scheduler)[0]["command"]
    assert cmd[cmd.index("--http-host") + 1] == "0.0.0.0" and cmd[cmd.index("--http-port") + 1] == "8001"


def test_gpu_workers_request_a_gpu_each_and_have_time_to_drain(base):
    worker = _find(base, "Deployment", "gpu-worker")
    c = _containers(worker)[0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"].get("nvidia.com/gpu", 1) == 1
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 120
    port = int(c["command"][c["command"].index("--metrics-port") + 1])
    assert {"metrics": port}.items() <= {p["name"]: p["containerPort"] for p in c["ports"]}.items()
    # celery beat runs once
    beat = _find(base, "Deployment", "celery-beat")
    assert beat["spec"]["replicas"] == 1 and beat["spec"]["strategy"]["type"] == "Recreate"


def test_keda_scales_the_worker_deployment_on_the_scheduler_gauge(base):
    scaled = _find(_docs(KUBE / "components" / "keda"), "ScaledObject", "gpu-worker")
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment" and target.get("apiVersion", "apps/v1") == "apps/v1"
    assert _find(base, "Deployment", target["name"]) is not None
    assert spec["minReplicaCount"] == 1 and spec["maxReplicaCount"] >= 2 and spec["cooldownPeriod"] > 0
    trigger = spec["triggers"][0]
    assert trigger["type"] == "prometheus" and PROMETHEUS_TRIGGER_KEYS <= set(trigger["metadata"])
    assert "pagedfleet_desired_workers" in trigger["metadata"]["query"]
    float(trigger["metadata"]["threshold"])
    # the HPA behaviour KEDA passes on is a valid autoscaling/v2 behaviour
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "check"},
           "spec": {"scaleTargetRef": target, "maxReplicas": spec["maxReplicaCount"], "behavior": behavior}}
    kubernetes_validate.validate(hpa, VERSIONS[-1], strict=True)
    # the ServiceMonitors select the Services of the base, on ports they have
    services = [d for d in base if d["kind"] == "Service"]
    for monitor in _docs(KUBE / "components" / "prometheus-operator"):
        if monitor["kind"] != "ServiceMonitor":
            continue
        wanted = monitor["spec"]["selector"]["matchLabels"].items()
        matched = [s for s in services if wanted <= s["metadata"]["labels"].items()]
        assert matched, monitor["metadata"]["name"]
        for s in matched:
            assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in s["spec"]["ports"]}


def _ingress_rules(policies: list[dict], labels: dict, port: int) -> list[dict]:
    """The ingress rules of the policies that select pods with these labels and admit this port."""
    rules = []
    for pol in policies:
        if pol["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items():
            for rule in pol["spec"].get("ingress", []):
                if not rule.get("ports") or any(p.get("port") == port for p in rule["ports"]):
                    rules.append(rule)
    return rules


def test_internal_ports_are_reachable_only_inside_the_namespace(base):
    policies = [d for d in base if d["kind"] == "NetworkPolicy"]
    for name, port in INTERNAL_PORTS.items():
        workload = next(w for w in _workloads(base) if w["metadata"]["name"] == name)
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert any(p["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items() for p in policies), name
        for rule in _ingress_rules(policies, labels, port):
            # a rule without `from` admits every source; a namespaceSelector or ipBlock admits other namespaces
            assert rule.get("from"), (name, rule)
            assert all(set(peer) == {"podSelector"} for peer in rule["from"]), (name, rule)
    gateway = _find(base, "Deployment", "gateway")["spec"]["template"]["metadata"]["labels"]
    assert any(not r.get("from") for r in _ingress_rules(policies, gateway, 8000)), "the gateway API must be public"
    # the optional Prometheus allowance opens only the metrics ports, to one namespace
    for pol in _docs(KUBE / "components" / "prometheus-operator"):
        if pol["kind"] == "NetworkPolicy":
            for rule in pol["spec"]["ingress"]:
                assert rule["from"] and all("namespaceSelector" in peer for peer in rule["from"])
                assert {p["port"] for p in rule["ports"]} <= {8000, 8001, 8002}
