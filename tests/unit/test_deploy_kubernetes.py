"""deploy/kubernetes/: the manifests agree with each other and with the server's flags and defaults.

No cluster runs here: the manifests are parsed (PyYAML) and cross-checked: labels and selectors,
ports and probes, the grace periods, the environment (every variable one the server reads, and a
set it accepts), the image's user, and the Prometheus scrape paths (ServiceMonitor, annotations).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from remoteloss_server import cli
from remoteloss_server.config import ServerConfig
from remoteloss_server.servicer import SERVICE_NAME

from tests import tools

FOLDER = tools.ROOT / "deploy" / "kubernetes"
DEFAULTS = ServerConfig()
# Every REMOTELOSS_* variable the server reads (API keys come only from the environment).
ENV_NAMES = {name for setting in cli._SETTINGS for name in setting.env} | (
    {cli._API_KEYS_ENV} if hasattr(cli, "_API_KEYS_ENV") else set()
)


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    """Every object in deploy/kubernetes/*.yaml and kserve/*.yaml, by kind (one of each)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(FOLDER.glob("*.yaml")) + sorted((FOLDER / "kserve").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is None:
                continue
            kind = document["kind"]
            assert kind not in found, f"{path.name}: a second {kind}"
            found[kind] = document
    assert set(found) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor",
                          "InferenceService"}
    return found


def pod_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    """A Deployment's pod template spec, or a KServe InferenceService's predictor (a pod spec too)."""
    spec: dict[str, Any] = (manifest["spec"]["predictor"] if manifest["kind"] == "InferenceService"
                            else manifest["spec"]["template"]["spec"])
    return spec


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod_spec(deployment)["containers"]
    (only,) = containers
    return only


def ports(deployment: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}


def environment(deployment: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(deployment)["env"]}


def test_labels_and_selectors_agree(manifests: dict[str, dict[str, Any]]) -> None:
    deployment = manifests["Deployment"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items(), "the Deployment's selector must match its own pods"
    service = manifests["Service"]
    assert service["spec"]["selector"] == selector
    assert manifests["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == selector
    monitor = manifests["ServiceMonitor"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    target = manifests["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"], "Deployment", deployment["metadata"]["name"]
    )


def test_ports_and_the_environment_match_the_server(manifests: dict[str, dict[str, Any]]) -> None:
    deployment = manifests["Deployment"]
    assert ports(deployment) == {"grpc": DEFAULTS.port, "http": DEFAULTS.http_port, "metrics": DEFAULTS.metrics_port}
    env = environment(deployment)
    unknown = sorted(set(env) - ENV_NAMES)
    assert not unknown, f"the server reads no {unknown} (see remoteloss-server --help)"
    config = cli._config(cli._parser().parse_args([]), env)  # what the server makes of it
    assert config.port == ports(deployment)["grpc"] and config.metrics_port == ports(deployment)["metrics"]
    assert config.http_port == ports(deployment)["http"], "the Open Inference Protocol's REST port"
    assert config.host == "[::]", "the Service, the probes and Prometheus need every interface, not loopback"
    assert config.device.startswith("cuda"), "a pod that asks for a GPU computes on it"
    service = manifests["Service"]
    assert service["spec"]["clusterIP"] == "None", "headless: clients balance over the pods themselves"
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    for name, number in ports(deployment).items():
        assert by_name[name]["targetPort"] == name and by_name[name]["port"] == number
    monitor = manifests["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == config.metrics_port
    assert annotations["prometheus.io/path"] == "/metrics"


def test_one_gpu_per_pod(manifests: dict[str, dict[str, Any]]) -> None:
    resources = container(manifests["Deployment"])["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"].get("nvidia.com/gpu", 1) == 1


def test_probes_ask_the_grpc_health_service(manifests: dict[str, dict[str, Any]]) -> None:
    spec = container(manifests["Deployment"])
    grpc_port = ports(manifests["Deployment"])["grpc"]
    readiness = spec["readinessProbe"]["grpc"]
    assert readiness == {"port": grpc_port, "service": SERVICE_NAME}
    for probe in ("livenessProbe", "startupProbe"):
        assert spec[probe]["grpc"]["port"] == grpc_port, probe
        assert spec[probe]["grpc"].get("service", "") in ("", SERVICE_NAME), probe


def test_termination_outlasts_the_pre_stop_pause_and_the_drain(manifests: dict[str, dict[str, Any]]) -> None:
    deployment = manifests["Deployment"]
    config = cli._config(cli._parser().parse_args([]), environment(deployment))
    pause = 0.0
    pre_stop = container(deployment).get("lifecycle", {}).get("preStop")
    if pre_stop:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep", "a preStop hook here only pauses"
        pause = float(command[1])
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > pause + config.shutdown_grace_s
    assert config.shutdown_grace_s >= DEFAULTS.shutdown_grace_s


def test_scaling_and_disruption_leave_a_pod_serving(manifests: dict[str, dict[str, Any]]) -> None:
    deployment = manifests["Deployment"]
    assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns the replica count"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    hpa = manifests["HorizontalPodAutoscaler"]["spec"]
    assert 2 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    pdb = manifests["PodDisruptionBudget"]["spec"]
    assert pdb.get("maxUnavailable") == 1 or pdb.get("minAvailable", hpa["minReplicas"]) < hpa["minReplicas"], (
        "with minReplicas pods, the budget must still allow a node drain"
    )
    for metric in hpa["metrics"]:
        if metric["type"] == "Pods":
            assert metric["pods"]["metric"]["name"] == "remoteloss_requests_in_flight"


def test_the_pod_runs_as_the_image_user(manifests: dict[str, dict[str, Any]]) -> None:
    user = re.search(r"(?m)^USER\s+(\d+)(?::(\d+))?", (tools.ROOT / "Dockerfile").read_text())
    assert user, "the Dockerfile's USER must be numeric, for runAsNonRoot"
    context = manifests["Deployment"]["spec"]["template"]["spec"]["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == int(user[1])
    if user[2]:
        assert context["runAsGroup"] == int(user[2])


def test_annotation_scrape_config_keeps_these_pods() -> None:
    """deploy/prometheus/prometheus.kubernetes.yml keeps pods by the Deployment's name label and
    the `metrics` port name; promtool checks the rest (tests/integration/test_deploy.py)."""
    deployment = next(
        d for d in yaml.safe_load_all((FOLDER / "deployment.yaml").read_text()) if d and d["kind"] == "Deployment"
    )
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    config = yaml.safe_load((tools.ROOT / "deploy" / "prometheus" / "prometheus.kubernetes.yml").read_text())
    (job,) = config["scrape_configs"]
    keeps = {
        tuple(rule["source_labels"]): rule["regex"] for rule in job["relabel_configs"] if rule.get("action") == "keep"
    }
    assert re.fullmatch(keeps[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)], labels["app.kubernetes.io/name"])
    assert re.fullmatch(keeps[("__meta_kubernetes_pod_container_port_name",)], "metrics")
    assert job["job_name"] == "remoteloss"


def test_manifests_name_no_unknown_files() -> None:
    assert sorted(p.name for p in FOLDER.iterdir()) == sorted(
        ["deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml", "servicemonitor.yaml", "kserve"]
    ), "a new manifest needs its checks here"
    # Apart, so that `kubectl apply -f deploy/kubernetes/` applies the plain manifests only.
    assert sorted(p.name for p in (FOLDER / "kserve").iterdir()) == ["inferenceservice.yaml"]


# KServe's names (its constants package): the container a custom predictor's pod must name, and the
# variable through which a custom predictor declares its protocol.
KSERVE_CONTAINER = "kserve-container"
KSERVE_PROTOCOL_ENV = "PROTOCOL"


def test_inference_service_is_a_raw_v2_custom_predictor(manifests: dict[str, dict[str, Any]]) -> None:
    service = manifests["InferenceService"]
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    predictor = service["spec"]["predictor"]
    assert not {"model", "triton", "sklearn", "pytorch"} & set(predictor), "a custom predictor: containers only"
    spec = container(service)
    assert spec["name"] == KSERVE_CONTAINER
    assert environment(service)[KSERVE_PROTOCOL_ENV] == "v2"
    assert spec["image"] == container(manifests["Deployment"])["image"], "the same image as deployment.yaml"
    # Knative (KServe's serverless mode) allows one container port; REST and gRPC need two.
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]


def test_inference_service_ports_and_environment_match_the_server(manifests: dict[str, dict[str, Any]]) -> None:
    service = manifests["InferenceService"]
    env = {name: value for name, value in environment(service).items() if name != KSERVE_PROTOCOL_ENV}
    unknown = sorted(set(env) - ENV_NAMES)
    assert not unknown, f"the server reads no {unknown} (see remoteloss-server --help)"
    config = cli._config(cli._parser().parse_args([]), env)
    found = ports(service)
    # KServe's Service sends port 80 to the first container port: the protocol's REST endpoints.
    assert list(found) == ["http", "grpc", "metrics"]
    assert found == {"http": config.http_port, "grpc": config.port, "metrics": config.metrics_port}
    assert config.host == "[::]"
    assert config.device.startswith("cuda")
    resources = container(service)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1


def test_inference_service_probes_ask_the_protocol_health_paths(manifests: dict[str, dict[str, Any]]) -> None:
    service = manifests["InferenceService"]
    spec = container(service)
    http_port = ports(service)["http"]
    assert spec["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": http_port}
    for probe in ("livenessProbe", "startupProbe"):
        assert spec[probe]["httpGet"] == {"path": "/v2/health/live", "port": http_port}, probe


def test_inference_service_stops_and_runs_like_the_deployment(manifests: dict[str, dict[str, Any]]) -> None:
    service = manifests["InferenceService"]
    config = cli._config(cli._parser().parse_args([]), {
        name: value for name, value in environment(service).items() if name != KSERVE_PROTOCOL_ENV
    })
    command = container(service)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert pod_spec(service)["terminationGracePeriodSeconds"] > float(command[1]) + config.shutdown_grace_s
    deployment = manifests["Deployment"]
    assert pod_spec(service)["securityContext"] == pod_spec(deployment)["securityContext"]
    assert container(service)["securityContext"] == container(deployment)["securityContext"]
