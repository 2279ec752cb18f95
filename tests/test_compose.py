"""docker-compose.yml: valid against the Compose Specification schema, and every command it runs exists.

No Docker engine runs here: the schema is ../shared/schemas/compose-spec.json (beside the repository), read
with jsonschema; commands are checked against the project's files (modules, console scripts, Procfile).
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = ROOT.parent / "shared" / "schemas" / "compose-spec.json"
PYTHON_SERVICES = {"gateway", "scheduler", "gpu_worker", "celery_worker", "celery_beat", "batch_worker"}


def _interpolate(value, env: dict[str, str]):
    """Compose variable interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, $VAR, and $$ for a literal $."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value
    pattern = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")

    def sub(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, default = m.group(3), m.group(4)
        v = env.get(name)
        if op == ":-" and not v:
            return default
        if op == "-" and v is None:
            return default
        return v or ""

    return pattern.sub(sub, value)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    if not SCHEMA.exists():
        pytest.fail(f"compose schema not found at {SCHEMA} (shared/ must sit beside the repository)")
    return json.loads(SCHEMA.read_text())


def test_compose_matches_the_compose_spec(compose, schema):
    validator = jsonschema.Draft7Validator(schema)
    for doc in (compose, _interpolate(compose, {})):
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_compose_has_the_whole_fleet(compose):
    services = compose["services"]
    assert {"redis", "gateway", "scheduler", "gpu_worker", "celery_worker", "celery_beat", "prometheus",
            "grafana"} <= set(services)
    for name in PYTHON_SERVICES:
        svc = services[name]
        assert svc["build"]["context"] == "." and (ROOT / svc["build"].get("dockerfile", "Dockerfile")).exists()
    # the GPU worker reserves an NVIDIA GPU and scales
    worker = _interpolate(services["gpu_worker"], {})
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert int(worker["deploy"]["replicas"]) >= 1
    assert "ports" not in worker, "a fixed host port would stop --scale gpu_worker=N"
    assert "container_name" not in worker
    # Grafana starts provisioned: datasource + dashboards mounted
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"]["volumes"] if v.startswith("./")}
    assert mounts["/etc/grafana/provisioning"] == "./monitoring/grafana/provisioning"
    assert mounts["/var/lib/grafana/dashboards"] == "./monitoring/grafana/dashboards"


def test_bind_mounts_exist(compose):
    for name, svc in compose["services"].items():
        for v in svc.get("volumes", []):
            src = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
            if src.startswith("."):
                assert (ROOT / src).exists(), f"{name}: {src} does not exist"
    prom = compose["services"]["prometheus"]
    cfg = next(a.split("=", 1)[1] for a in prom["command"] if a.startswith("--config.file="))
    assert cfg == "/etc/prometheus/prometheus.yml"
    assert (ROOT / "monitoring/prometheus/prometheus.yml").exists()


def test_dockerfile_installs_the_pinned_requirements():
    text = (ROOT / "Dockerfile").read_text()
    assert "requirements.txt" in text
    assert re.search(r"^torch==2\.13\.0$", (ROOT / "requirements.txt").read_text(), re.M)
    for pkg in ("protocol", "scheduler", "gpu_worker", "kernels", "gateway", "pagedfleet"):
        assert re.search(rf"COPY {pkg} ", text), f"the image lacks {pkg}/"


# --- commands --------------------------------------------------------------------------------------
def _module_file(module: str) -> Path | None:
    base = ROOT / module.replace(".", "/")
    for p in (base.with_suffix(".py"), base / "__main__.py"):
        if p.exists():
            return p
    return None


def _defines(path: Path, name: str) -> bool:
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return True
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            return True
    return False


def _console_scripts() -> dict[str, str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return data.get("project", {}).get("scripts", {})


def _procfile() -> dict[str, str]:
    p = ROOT / "Procfile"
    if not p.exists():
        return {}
    out = {}
    for line in p.read_text().splitlines():
        if ":" in line and not line.lstrip().startswith("#"):
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    return out


def _argv(command) -> list[str]:
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    argv = [a.replace("$$", "$") for a in argv]
    if argv[:2] in (["sh", "-c"], ["bash", "-c"], ["/bin/sh", "-c"]):
        inner = shlex.split(argv[2])
        if inner and inner[0] == "exec":
            inner = inner[1:]
        return inner
    return argv


def check_command(argv: list[str]) -> str | None:
    """None when the command's program exists in the project, else why not."""
    if not argv:
        return "empty command"
    prog = Path(argv[0]).name
    if prog in ("python", "python3") and len(argv) >= 3 and argv[1] == "-m":
        mod = argv[2]
        if mod == "uvicorn":
            return check_command(argv[2:])
        return None if _module_file(mod) else f"no module {mod} in the project"
    if prog == "uvicorn":
        target = next(a for a in argv[1:] if not a.startswith("-"))
        mod, _, attr = target.partition(":")
        path = _module_file(mod)
        if path is None:
            return f"no module {mod}"
        return None if _defines(path, attr) else f"{mod} defines no {attr}"
    if prog == "celery":
        app = argv[argv.index("-A") + 1] if "-A" in argv else next(a.split("=", 1)[1] for a in argv
                                                                   if a.startswith("--app="))
        mod = app.split(":")[0]
        return None if _module_file(mod) or (ROOT / mod.replace(".", "/") / "__init__.py").exists() \
            else f"no celery app module {mod}"
    scripts = _console_scripts()
    if prog in scripts:
        mod, _, func = scripts[prog].partition(":")
        path = _module_file(mod)
        return None if path and _defines(path, func) else f"console script {prog} -> {scripts[prog]} is missing"
    procs = _procfile()
    if prog in ("honcho", "foreman") and "start" in argv:
        names = [a for a in argv[argv.index("start") + 1:] if not a.startswith("-")]
        missing = [n for n in names if n not in procs]
        return f"Procfile has no {missing}" if missing else None
    return f"unknown program {prog!r}"


@pytest.mark.parametrize("service", sorted(PYTHON_SERVICES))
def test_service_command_exists(compose, service):
    svc = compose["services"][service]
    assert "command" in svc, f"{service} has no command"
    problem = check_command(_argv(svc["command"]))
    assert problem is None, f"{service}: {problem}"


def test_gpu_worker_command_runs_on_cuda_and_serves_metrics(compose):
    argv = _argv(compose["services"]["gpu_worker"]["command"])
    assert argv[:3] == ["python", "-m", "gpu_worker.service"]
    assert argv[argv.index("--device") + 1] == "cuda"
    assert "--metrics-port" in argv and "--advertise-host" in argv
    # no shell wrapper: the worker resolves its own address, and the service accepts every flag
    assert argv[argv.index("--advertise-host") + 1] == "auto"
    from gpu_worker.settings import WorkerSettings

    args = WorkerSettings.from_cli(argv[3:])
    assert args.device == "cuda" and args.worker_metrics_port == 8002 and args.advertise_host == "auto"
    assert args.worker_metrics_host == "0.0.0.0"  # its default is 127.0.0.1: Prometheus scrapes it over the network


def test_every_service_command_parses_with_its_settings(compose):
    from gateway.settings import GatewaySettings
    from scheduler.server.config import SchedulerSettings

    for name, model in (("gateway", GatewaySettings), ("scheduler", SchedulerSettings)):
        argv = _argv(compose["services"][name]["command"])
        s = model.from_cli(argv[3:])
        assert (s.host if name == "gateway" else s.scheduler_host) == "0.0.0.0", name


def test_advertise_host_auto_resolves_an_address():
    import ipaddress

    from gpu_worker.service import host_port, resolve_advertise_host

    assert resolve_advertise_host("10.0.0.7", "redis://redis:6379/0") == "10.0.0.7"
    # the local address of the route to Redis: loopback for a local Redis, a real address otherwise
    assert resolve_advertise_host("auto", "redis://127.0.0.1:6379/0") == "127.0.0.1"
    for url in ("redis://192.0.2.1:6379/0", "redis://no-such-host.invalid:6379/0", "unix:///tmp/redis.sock"):
        ipaddress.ip_address(resolve_advertise_host("auto", url))
    assert host_port("10.0.0.7", 8002) == "10.0.0.7:8002" and host_port("fd00::7", 8002) == "[fd00::7]:8002"


def test_procfile_entries_exist():
    for name, line in _procfile().items():
        argv = shlex.split(line)
        while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):  # leading VAR=value
            argv = argv[1:]
        if argv and argv[0] == "exec":
            argv = argv[1:]
        problem = check_command(argv)
        assert problem is None, f"Procfile {name}: {problem}"
