"""The Helm chart: lint, render every example, validate the manifests, keep its config in step with the app.

The tools come from .ci/chart-tools.sh (`make chart` runs it, then these tests with the tools required); run
alone without them, the tests skip and say how to get them. HELM, KUBERNETES_VALIDATE and NODE override the
paths.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Hashable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.settings import DefinitionsSettings, Settings

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm"
SCHEMA = CHART / "values.schema.json"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
MINIMAL = ("--values", str(CHART / "examples" / "minimal.yaml"))
TOOLS = Path(os.environ.get("TOOLS_DIR", ROOT / ".tools"))
# The chart's kubeVersion floor and the newest schemas kubernetes-validate 1.37.0 ships.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# Kinds kubernetes-validate has no schema for; .ci/validate-crds.mjs checks them against their CRDs.
CRD_KINDS = {("gateway.networking.k8s.io/v1", "HTTPRoute"), ("monitoring.coreos.com/v1", "ServiceMonitor")}
# Keys the chart sets itself (bind from containerPort, the credentials from Secret references): the generated
# config schema leaves them out, so a values file that sets them is refused.
CHART_MANAGED_KEYS = {
    "Settings": ("bind", "health_port"),
    "RedisSettings": ("url", "sentinel_password"),
    "AuthSettings": ("hmac_key",),
}
UPDATE_SCHEMA_ENV = "EDGE_PROXY_UPDATE_CHART_SCHEMA"

Manifest = dict[str, Any]


def _missing(what: str) -> None:
    reason = f"{what} not found: run .ci/chart-tools.sh (or `make chart`)"
    if os.environ.get("EDGE_PROXY_CHART_TOOLS") == "required":
        pytest.fail(reason)
    pytest.skip(reason)


def _tool(env: str, default: Path) -> str:
    found = os.environ.get(env) or (str(default) if default.is_file() else None)
    if found is None:
        _missing(f"{default.name} (or ${env})")
    return str(found)


@pytest.fixture(scope="module")
def helm() -> str:
    """The helm binary."""
    return _tool("HELM", TOOLS / "bin" / "helm")


@pytest.fixture(scope="module")
def kubernetes_validate() -> str:
    """The kubernetes-validate command."""
    return _tool("KUBERNETES_VALIDATE", TOOLS / "bin" / "kubernetes-validate")


@pytest.fixture(scope="module")
def crd_validate() -> list[str]:
    """The command that validates custom resources against their CRD schemas."""
    node = os.environ.get("NODE") or shutil.which("node")
    if node is None or not (TOOLS / "npm" / "node_modules" / "@kubernetes-models").is_dir():
        _missing("node or the CRD schemas in .tools/npm")
    return [str(node), str(ROOT / ".ci" / "validate-crds.mjs")]


# --- YAML without duplicate keys ---------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a mapping with a repeated key (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Hashable] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_manifests(text: str) -> list[Manifest]:
    """Every non-empty document of a rendered chart; duplicate keys are an error."""
    return [doc for doc in yaml.load_all(text, Loader=_UniqueKeyLoader) if doc]


def test_duplicate_keys_are_refused() -> None:
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'envFrom'"):
        load_manifests("spec:\n  envFrom: []\n  image: x\n  envFrom: []\n")


# --- helm ------------------------------------------------------------------------------------------------


def run(
    *argv: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command and capture its output (the caller checks the exit status)."""
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=env, timeout=120, check=False)


def template(helm: str, *args: str, chart: Path = CHART) -> subprocess.CompletedProcess[str]:
    """`helm template` of the chart as release "edge-proxy" in namespace "flags"."""
    return run(helm, "template", "edge-proxy", str(chart), "--namespace", "flags", *args)


@functools.cache
def _render_cached(helm: str, values: Path) -> str:
    result = template(helm, "--values", str(values))
    assert result.returncode == 0, result.stderr
    return result.stdout


def render(helm: str, values: Path) -> list[Manifest]:
    """The manifests one example values file renders (rendered once per test session)."""
    return load_manifests(_render_cached(helm, values))


def one(manifests: list[Manifest], kind: str) -> Manifest:
    """The only manifest of this kind."""
    found = [m for m in manifests if m["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} manifests"
    return found[0]


def pod_spec(manifests: list[Manifest]) -> Manifest:
    """The Deployment's pod spec."""
    spec: Manifest = one(manifests, "Deployment")["spec"]["template"]["spec"]
    return spec


def proxy_container(spec: Manifest, name: str = "edge-proxy") -> Manifest:
    """The proxy's container in a pod spec."""
    found: list[Manifest] = [c for c in spec["containers"] if c["name"] == name]
    assert len(found) == 1, [c["name"] for c in spec["containers"]]
    return found[0]


def test_lint_strict(helm: str) -> None:
    for values in [None, *EXAMPLES]:
        result = run(helm, "lint", "--strict", str(CHART), *(["--values", str(values)] if values else []))
        assert result.returncode == 0, f"{values}: {result.stdout}{result.stderr}"


def test_every_example_is_tested() -> None:
    assert {p.name for p in EXAMPLES} == {
        "minimal.yaml",
        "fleet.yaml",
        "fleet-httproute.yaml",
        "sidecar.yaml",
    }


@pytest.mark.parametrize("values", EXAMPLES, ids=lambda p: p.stem)
def test_example_renders_valid_manifests(
    helm: str, kubernetes_validate: str, crd_validate: list[str], values: Path, tmp_path: Path
) -> None:
    manifests = render(helm, values)
    assert manifests
    assert_valid(manifests, kubernetes_validate, crd_validate, tmp_path)


def assert_valid(
    manifests: list[Manifest], kubernetes_validate: str, crd_validate: list[str], tmp: Path
) -> None:
    """Core kinds pass kubernetes-validate --strict for each version; custom resources their CRD schema."""
    core = [m for m in manifests if (m["apiVersion"], m["kind"]) not in CRD_KINDS]
    custom = [m for m in manifests if (m["apiVersion"], m["kind"]) in CRD_KINDS]
    if core:
        path = tmp / "core.yaml"
        path.write_text(yaml.safe_dump_all(core), encoding="utf-8")
        versions = [arg for version in KUBERNETES_VERSIONS for arg in ("-k", version)]
        result = run(kubernetes_validate, "--strict", *versions, str(path))
        assert result.returncode == 0, result.stdout + result.stderr
        passed = [
            line for line in result.stdout.splitlines() if line.startswith("INFO") and " passed " in line
        ]
        # Nothing skipped: a kind without a schema would only WARN and still exit 0.
        assert len(passed) == len(core) * len(KUBERNETES_VERSIONS), result.stdout
    if custom:
        path = tmp / "custom.json"
        path.write_text(json.dumps(custom), encoding="utf-8")
        result = run(*crd_validate, str(path), env={**os.environ, "TOOLS_DIR": str(TOOLS)})
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.count("OK ") == len(custom), result.stdout


@pytest.mark.parametrize("values", EXAMPLES, ids=lambda p: p.stem)
def test_example_config_is_accepted_by_the_app(helm: str, values: Path, tmp_path: Path) -> None:
    manifests = render(helm, values)
    config = one(manifests, "ConfigMap")["data"]["config.yaml"]
    load_manifests(config)
    assert_check_config(config, tmp_path)


def assert_check_config(config: str, tmp: Path) -> str:
    """`edge-proxy check-config` accepts the rendered file, with the env the chart sets from Secrets."""
    path = tmp / "config.yaml"
    path.write_text(config, encoding="utf-8")
    env = {name: value for name, value in os.environ.items() if not name.startswith("EDGE_PROXY")}
    env.update(REDIS_URL="redis://:secret@redis:6379/0", VERDICT_HMAC_KEY="0123456789abcdef0123")
    result = run(sys.executable, "-m", "proxy", "check-config", "--config", str(path), env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_check_config_catches_a_bad_rendered_config(tmp_path: Path) -> None:
    # The check above is only worth something if check-config refuses what the app would refuse.
    with pytest.raises(AssertionError, match=r"upstream\.read_timeout_second"):
        assert_check_config("upstream:\n  read_timeout_second: 3\n", tmp_path)


def test_fleet_pods_are_hardened_and_probed(helm: str) -> None:
    manifests = render(helm, CHART / "examples" / "fleet.yaml")
    spec = pod_spec(manifests)
    assert spec["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert spec["automountServiceAccountToken"] is False
    container = proxy_container(spec)
    assert_hardened(container)
    assert container["args"] == ["serve", "--config", "/etc/edge-proxy/config.yaml"]
    assert {port["name"]: port["containerPort"] for port in container["ports"]} == {
        "http": 8080,
        "health": 8081,
    }
    probes = {
        kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    # Startup and liveness on the probes' own listener (outside the client connection limit: a proxy whose
    # clients hold every place is not restarted); readiness where clients come, closed when a drain begins.
    assert probes == {
        "startupProbe": {"path": "/_startup", "port": "health"},
        "livenessProbe": {"path": "/_liveness", "port": "health"},
        "readinessProbe": {"path": "/_startup", "port": "http"},
    }
    config = yaml.safe_load(one(manifests, "ConfigMap")["data"]["config.yaml"])
    assert config["bind"] == "0.0.0.0:8080"
    assert config["health_port"] == 8081
    assert config["service_mode"] == "definitions"
    assert_drain_fits(spec["terminationGracePeriodSeconds"], container, config)
    # Spread across zones and nodes, and kept available through voluntary disruptions.
    keys = [c["topologyKey"] for c in spec["topologySpreadConstraints"]]
    assert keys == ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
    assert one(manifests, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert one(manifests, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    assert "replicas" not in one(manifests, "Deployment")["spec"]  # the HPA owns it
    [endpoint] = one(manifests, "ServiceMonitor")["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", Settings().telemetry.metrics_path)


def assert_hardened(container: Manifest) -> None:
    """The container runs as a non-root uid on a read-only root with no capabilities."""
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 10001
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    names = [env["name"] for env in container["env"]]
    assert len(names) == len(set(names)), names
    # Credentials only by reference.
    for env in container["env"]:
        if env["name"] in {"REDIS_URL", "VERDICT_HMAC_KEY", "REDIS_SENTINEL_PASSWORD"}:
            assert set(env) == {"name", "valueFrom"}
            assert set(env["valueFrom"]) == {"secretKeyRef"}


def assert_drain_fits(grace: int, container: Manifest, config: Manifest) -> None:
    """preStop sleep, then the drain, then the final billing flush, all before Kubernetes' SIGKILL."""
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = config.get("shutdown_timeout_seconds", Settings().shutdown_timeout_seconds)
    flush = config.get("billing", {}).get("final_flush_timeout_seconds", 5.0)
    assert pre_stop + drain + flush < grace, (pre_stop, drain, flush, grace)


def test_config_change_rolls_the_pods(helm: str) -> None:
    def checksum(*extra: str) -> str:
        result = template(helm, *MINIMAL, *extra)
        assert result.returncode == 0, result.stderr
        annotations = one(load_manifests(result.stdout), "Deployment")["spec"]["template"]["metadata"][
            "annotations"
        ]
        value: str = annotations["checksum/config"]
        return value

    assert checksum() != checksum("--set", "config.upstream.read_timeout_seconds=5")
    assert checksum() == checksum("--set", "replicaCount=7")


def _matches(selector: Manifest, labels: Manifest) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


@pytest.mark.parametrize("values", ["fleet.yaml", "fleet-httproute.yaml"])
def test_fleet_objects_point_at_each_other(helm: str, values: str) -> None:
    """Selectors, targets and ports are wired to the objects they name: a wrong one renders valid YAML
    that kubernetes-validate cannot see (a Service without endpoints, a PDB or HPA guarding nothing)."""
    manifests = render(helm, CHART / "examples" / values)
    deployment = one(manifests, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    service = one(manifests, "Service")
    assert _matches(service["spec"]["selector"], pod_labels)
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    port_names = {port["name"] for port in container["ports"]}
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= port_names
    assert _matches(one(manifests, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    target = one(manifests, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        deployment["metadata"]["name"],
    )
    service_ports = {port["name"]: port["port"] for port in service["spec"]["ports"]}
    for monitor in (m for m in manifests if m["kind"] == "ServiceMonitor"):
        assert _matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        assert {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]} <= set(service_ports)
    for route in (m for m in manifests if m["kind"] == "HTTPRoute"):
        [rule] = route["spec"]["rules"]
        fleet = [ref for ref in rule["backendRefs"] if ref["name"] == service["metadata"]["name"]]
        assert [ref["port"] for ref in fleet] == [service_ports["http"]]


def test_sidecar_config_change_rolls_the_app_pods(helm: str, tmp_path: Path) -> None:
    def checksum(*extra: str) -> str:
        chart = tmp_path / "legacy" / "helm"
        if not chart.exists():
            shutil.copytree(CHART, chart)
            result = run(helm, "dependency", "build", str(chart / "examples" / "legacy-app"))
            assert result.returncode == 0, result.stdout + result.stderr
        result = template(helm, *extra, chart=chart / "examples" / "legacy-app")
        assert result.returncode == 0, result.stderr
        deployment = one(load_manifests(result.stdout), "Deployment")
        value: str = deployment["spec"]["template"]["metadata"]["annotations"]["checksum/edge-proxy-config"]
        return value

    assert checksum() != checksum("--set", "edge-proxy.config.upstream.read_timeout_seconds=5")


def test_the_sidecar_has_its_own_resources(legacy_app: list[Manifest]) -> None:
    proxy = proxy_container(pod_spec(legacy_app))
    assert proxy["resources"]["requests"]["memory"]
    assert proxy["resources"]["limits"]["memory"]


def test_fleet_readiness_does_not_depend_on_redis(helm: str) -> None:
    """With Redis down the fleet still answers (memory, then forwarding); a readiness that follows Redis
    takes every fleet pod out at once, and a Gateway answers the HTTPRoute's fleet share with 503 (Gateway
    API: a backend without ready endpoints gets its share of 503s, the weight is not moved elsewhere)."""
    container = proxy_container(pod_spec(render(helm, CHART / "examples" / "fleet-httproute.yaml")))
    assert container["readinessProbe"]["httpGet"]["path"] == "/_startup"


def test_httproute_splits_the_app_definitions_paths(helm: str) -> None:
    manifests = render(helm, CHART / "examples" / "fleet-httproute.yaml")
    [rule] = one(manifests, "HTTPRoute")["spec"]["rules"]
    paths = [match["path"]["value"] for match in rule["matches"]]
    defaults = DefinitionsSettings()
    assert paths == [defaults.path, *defaults.aliases]
    assert all(match["path"]["type"] == "Exact" for match in rule["matches"])
    weights = {ref["name"]: ref["weight"] for ref in rule["backendRefs"]}
    fleet = one(manifests, "Service")["metadata"]["name"]
    assert weights == {fleet: 10, "posthog-web": 90}
    # The legacy Service is the app's, in its own namespace (where config.upstream.url points too); without a
    # namespace the reference would name a Service in the release's.
    namespaces = {ref["name"]: ref.get("namespace") for ref in rule["backendRefs"]}
    assert namespaces == {fleet: None, "posthog-web": "posthog"}
    upstream = yaml.safe_load(one(manifests, "ConfigMap")["data"]["config.yaml"])["upstream"]["url"]
    assert ".posthog.svc." in upstream


def test_the_legacy_service_is_in_the_releases_namespace_unless_named(helm: str) -> None:
    result = template(
        helm,
        "--values",
        str(CHART / "examples" / "fleet-httproute.yaml"),
        "--set",
        "httpRoute.legacyService.namespace=",
    )
    assert result.returncode == 0, result.stderr
    [rule] = one(load_manifests(result.stdout), "HTTPRoute")["spec"]["rules"]
    assert all("namespace" not in ref for ref in rule["backendRefs"])


def test_sidecar_mode_renders_only_the_config(helm: str) -> None:
    manifests = render(helm, CHART / "examples" / "sidecar.yaml")
    assert [m["kind"] for m in manifests] == ["ConfigMap"]
    config = yaml.safe_load(manifests[0]["data"]["config.yaml"])
    assert config["upstream"]["url"] == "http://127.0.0.1:8000"
    assert config["service_mode"] == "all"
    # The app's own /metrics must still reach the app through its sidecar.
    assert config["telemetry"]["metrics_path"] != Settings().telemetry.metrics_path


@pytest.fixture(scope="module")
def legacy_app(helm: str, tmp_path_factory: pytest.TempPathFactory) -> list[Manifest]:
    """The example app chart that includes the sidecar, rendered from a copy (`dependency build` writes)."""
    copy_root = tmp_path_factory.mktemp("chart") / "helm"
    shutil.copytree(CHART, copy_root)
    app = copy_root / "examples" / "legacy-app"
    result = run(helm, "dependency", "build", str(app))
    assert result.returncode == 0, result.stdout + result.stderr
    result = template(helm, chart=app)
    assert result.returncode == 0, result.stderr
    return load_manifests(result.stdout)


def test_sidecar_example_puts_the_proxy_in_front_of_the_app(
    legacy_app: list[Manifest], tmp_path: Path
) -> None:
    spec = pod_spec(legacy_app)
    app, proxy = spec["containers"]
    assert proxy["name"] == "edge-proxy"
    assert_hardened(proxy)
    proxy_port, health_port = proxy["ports"]
    assert health_port == {"name": "ep-health", "containerPort": 8081, "protocol": "TCP"}
    [app_port] = app["ports"]
    # The Service sends clients to the proxy, by the proxy's port name, never to the app directly.
    [service_port] = one(legacy_app, "Service")["spec"]["ports"]
    assert service_port["targetPort"] == proxy_port["name"] == "edge-proxy"
    assert proxy_port["name"] != app_port["name"]
    assert {probe["httpGet"]["port"] for probe in (proxy["startupProbe"], proxy["livenessProbe"])} == {
        "ep-health"
    }
    # The sidecar's readiness must not take the app's pod out of the Service when Redis is down; it goes to
    # the health port, where alone the health paths and metrics are answered in front of a public app.
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/_startup", "port": "ep-health"}
    # Its volumes are in the pod, and the pod rolls when its config changes.
    volumes = {volume["name"] for volume in spec["volumes"]}
    assert {mount["name"] for mount in proxy["volumeMounts"]} <= volumes
    assert (
        "checksum/edge-proxy-config"
        in one(legacy_app, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    )

    config_text = one(legacy_app, "ConfigMap")["data"]["config.yaml"]
    config = yaml.safe_load(config_text)
    assert config["upstream"]["url"] == f"http://127.0.0.1:{app_port['containerPort']}"
    assert config["bind"] == f"0.0.0.0:{proxy_port['containerPort']}"
    assert (config["health_port"], config["health_port_only"]) == (health_port["containerPort"], True)
    assert "configuration OK" in assert_check_config(config_text, tmp_path)
    assert_drain_fits(spec["terminationGracePeriodSeconds"], proxy, config)
    # The app keeps serving the proxy's forwards until the proxy has drained.
    assert app["lifecycle"]["preStop"]["sleep"]["seconds"] >= (
        proxy["lifecycle"]["preStop"]["sleep"]["seconds"] + config["shutdown_timeout_seconds"]
    )


def test_sidecar_example_is_valid(
    legacy_app: list[Manifest], kubernetes_validate: str, crd_validate: list[str], tmp_path: Path
) -> None:
    assert_valid(legacy_app, kubernetes_validate, crd_validate, tmp_path)


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        ("autoscaling.minReplica=2", "minReplica"),  # a typo in the chart's values
        ("config.upstream.read_timeout_second=5", "read_timeout_second"),  # a typo in the app's config
        ("config.rate_limits.mode=slow", "rate_limits"),  # a value the app would refuse
        ("config.redis.url=redis://:pw@redis:6379/0", "url"),  # an inline credential
        ("config.definitions.auth.hmac_key=0123456789abcdef", "hmac_key"),
        ("config.redis.sentinel_password=s3cret", "sentinel_password"),
        ("config.bind=0.0.0.0:9000", "bind"),  # the probes would not find the port
        ("httpRoute.proxyWeight=101", "proxyWeight"),
        ("mode=sidcar", "mode"),
    ],
)
def test_schema_refuses(helm: str, setting: str, complaint: str) -> None:
    result = template(helm, *MINIMAL, "--set", setting)
    assert result.returncode != 0
    assert "schema" in result.stderr
    assert complaint in result.stderr


@pytest.mark.parametrize(
    "name",
    [
        "REDIS_URL",
        "VERDICT_HMAC_KEY",
        "REDIS_SENTINEL_PASSWORD",
        "BIND",
        "SHUTDOWN_TIMEOUT_SECONDS",
        "UPSTREAM_URL",
        "EDGE_PROXY__REDIS__URL",
        "EDGE_PROXY__DEFINITIONS__AUTH__HMAC_KEY",
        "EDGE_PROXY__REDIS__SENTINEL_PASSWORD",
        "EDGE_PROXY__BIND",
        "EDGE_PROXY__SHUTDOWN_TIMEOUT_SECONDS",
    ],
)
def test_extra_env_cannot_override_settings_unchecked(helm: str, name: str) -> None:
    result = template(helm, *MINIMAL, "--set", f"extraEnv[0].name={name}", "--set", "extraEnv[0].value=x")
    assert result.returncode != 0
    assert "extraEnv" in result.stderr


def test_the_sentinels_password_comes_from_a_secret_reference(helm: str) -> None:
    def sentinel_env(*extra: str) -> list[Manifest]:
        result = template(helm, *MINIMAL, *extra)
        assert result.returncode == 0, result.stderr
        container = proxy_container(pod_spec(load_manifests(result.stdout)))
        assert_hardened(container)
        return [env for env in container["env"] if env["name"] == "REDIS_SENTINEL_PASSWORD"]

    assert sentinel_env() == []
    reference = {"secretKeyRef": {"name": "sentinels", "key": "sentinel-password"}}
    wanted = [{"name": "REDIS_SENTINEL_PASSWORD", "valueFrom": reference}]
    assert sentinel_env("--set", "redis.sentinelPassword.existingSecret.name=sentinels") == wanted


def test_extra_env_may_name_a_pod_wide_collector(helm: str) -> None:
    name, value = "OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel-collector:4318"
    result = template(
        helm, *MINIMAL, "--set", f"extraEnv[0].name={name}", "--set", f"extraEnv[0].value={value}"
    )
    assert result.returncode == 0, result.stderr
    assert f"name: {name}" in result.stdout


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        # preStop 10 + drain 15 + flush 5 = 30: no second left before SIGKILL.
        ((*MINIMAL, "--set", "preStop.sleepSeconds=10"), "does not fit in terminationGracePeriodSeconds"),
        # 5 + 19.9 + 5 = 29.9: a tenth of a second is not the second the README promises.
        ((*MINIMAL, "--set-json", "config.shutdown_timeout_seconds=19.9"), "with 1s to spare"),
        # 5 + 18 + 5 = 28 leaves 2 s, not the last OTLP exports' 2.5 s besides the second.
        (
            (
                *MINIMAL,
                "--set",
                "config.shutdown_timeout_seconds=18,config.telemetry.otlp_endpoint=http://c:4318",
            ),
            "with 3.5s to spare",
        ),
        (
            (
                *MINIMAL,
                "--set",
                "autoscaling.enabled=true,autoscaling.minReplicas=5,autoscaling.maxReplicas=3",
            ),
            "autoscaling.minReplicas is above autoscaling.maxReplicas",
        ),
        (
            (*MINIMAL, "--set", "serviceMonitor.enabled=true,config.workers=2"),
            "serviceMonitor.enabled with config.workers > 1",
        ),
        (
            (*MINIMAL, "--set-json", 'podLabels={"app.kubernetes.io/name":"x"}'),
            "podLabels may not set app.kubernetes.io/name",
        ),
        (
            (*MINIMAL, "--set-json", 'podAnnotations={"checksum/config":"pinned"}'),
            "podAnnotations may not set checksum/config",
        ),
        (
            (
                *MINIMAL,
                "--set",
                "serviceMonitor.enabled=true",
                "--set-json",
                'serviceMonitor.labels={"helm.sh/chart":"x"}',
            ),
            "serviceMonitor.labels may not set helm.sh/chart",
        ),
        (("--set", "redis.existingSecret.name=r"), "mode fleet needs config.upstream.url"),
        ((*MINIMAL, "--set", "redis.existingSecret.name="), "redis.existingSecret.name is required"),
        ((*MINIMAL, "--set", "mode=sidecar", "--set", "sidecar.appPort=8080"), "must differ"),
        ((*MINIMAL, "--set", "healthPort=8080"), "healthPort and containerPort must differ"),
        (
            (*MINIMAL, "--set", "mode=sidecar,sidecar.appPort=8081"),
            "healthPort and sidecar.appPort must differ",
        ),
        ((*MINIMAL, "--set", "config.health_port=9000"), "additional properties 'health_port' not allowed"),
        (
            (*MINIMAL, "--set-json", "healthPort=null", "--set", "config.health_port_only=true"),
            "needs healthPort",
        ),
        (
            (*MINIMAL, "--set", "serviceMonitor.enabled=true,config.health_port_only=true"),
            "with config.health_port_only the metrics are on healthPort alone",
        ),
        (
            (*MINIMAL, "--skip-schema-validation", "--set", "config.health_port=9000"),
            "config.health_port is managed by the chart: set healthPort instead",
        ),
        (
            (*MINIMAL, "--set", "config.telemetry.worker_metrics_port=8081"),
            "config.telemetry.worker_metrics_port: port 8081 would take healthPort (config health_port) 8081",
        ),
        ((*MINIMAL, "--set", "httpRoute.enabled=true"), "httpRoute.legacyService.name is required"),
        # Without host names an app route naming its host outranks the Exact paths: 0 % reach the fleet.
        (
            (
                *MINIMAL,
                "--set",
                "httpRoute.enabled=true,httpRoute.legacyService.name=web",
                "--set-json",
                'httpRoute.parentRefs=[{"name":"public"}]',
            ),
            "httpRoute.hostnames is required",
        ),
        (
            (*MINIMAL, "--set", "serviceMonitor.enabled=true,config.telemetry.metrics_enabled=false"),
            "needs config.telemetry.metrics_enabled",
        ),
        # The settings' checks across keys, which the schema sees one at a time.
        (
            (*MINIMAL, "--set", "config.definitions.path=/_readiness"),
            'config.definitions.path: "/_readiness" is already the route of the health probes',
        ),
        (
            (*MINIMAL, "--set-json", 'config.definitions.aliases=["/flags/definitions"]'),
            'config.definitions.aliases: "/flags/definitions" is already the route of '
            "config.definitions.path",
        ),
        (
            (*MINIMAL, "--set", "config.telemetry.metrics_path=/api/feature_flag/local_evaluation"),
            'config.telemetry.metrics_path: "/api/feature_flag/local_evaluation" is already the route of '
            "config.definitions.aliases",
        ),
        (
            (*MINIMAL, "--set", "mode=sidecar,config.telemetry.metrics_path=/_startup"),
            'config.telemetry.metrics_path: "/_startup" is already the route of the health probes',
        ),
        (
            (*MINIMAL, "--set", "config.telemetry.worker_metrics_port=8080"),
            "config.telemetry.worker_metrics_port: port 8080 would take containerPort (config bind) 8080",
        ),
        (
            (
                *MINIMAL,
                "--set",
                "containerPort=9000,config.telemetry.worker_metrics_port=8999,config.workers=2",
            ),
            "config.telemetry.worker_metrics_port: ports 8999-9000 (one per worker) would take containerPort",
        ),
        (
            (*MINIMAL, "--set", "config.telemetry.worker_metrics_port=65535,config.workers=2"),
            "config.telemetry.worker_metrics_port: ports 65535-65536 (one per worker) go past 65535",
        ),
        (
            (
                *MINIMAL,
                "--set",
                "config.telemetry.worker_metrics_port=9100,config.telemetry.metrics_enabled=false",
            ),
            "config.telemetry.worker_metrics_port needs config.telemetry.metrics_enabled",
        ),
        (
            (
                *MINIMAL,
                "--set",
                "mode=sidecar,sidecar.appPort=8000,config.telemetry.worker_metrics_port=7999,config.workers=2",
            ),
            "would take sidecar.appPort (the app's, in the same pod) 8000",
        ),
    ],
)
def test_template_refuses(helm: str, args: tuple[str, ...], complaint: str) -> None:
    result = template(helm, *args)
    assert result.returncode != 0
    assert complaint in result.stderr


# --- the config schema follows proxy/settings.py --------------------------------------------------


def config_definitions() -> dict[str, Any]:
    """JSON-schema definitions of the app's config file, from the settings model, less the chart's keys."""
    generated = Settings.model_json_schema(mode="validation", ref_template="#/definitions/config.{model}")
    definitions = {f"config.{name}": schema for name, schema in generated.pop("$defs").items()}
    definitions["config.Settings"] = generated
    for model, names in CHART_MANAGED_KEYS.items():
        for key in names:
            del definitions[f"config.{model}"]["properties"][key]
    without_titles: dict[str, Any] = _without_titles(definitions)
    return without_titles


def _without_titles(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: _without_titles(value) for key, value in node.items() if key != "title"}
    if isinstance(node, list):
        return [_without_titles(item) for item in node]
    return node


def _definitions(schema: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    for name, definition in schema["definitions"].items():
        if name.startswith("config."):
            yield name, definition


def test_values_schema_config_follows_the_settings_model() -> None:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    wanted = config_definitions()
    if os.environ.get(UPDATE_SCHEMA_ENV) == "1":
        updated = copy.deepcopy(schema)
        updated["definitions"] = {
            **{
                name: value for name, value in schema["definitions"].items() if not name.startswith("config.")
            },
            **dict(sorted(wanted.items())),
        }
        SCHEMA.write_text(json.dumps(updated, indent=2) + "\n", encoding="utf-8")
        schema = updated
    assert dict(_definitions(schema)) == wanted, (
        f"helm/values.schema.json is behind proxy/settings.py: run `{UPDATE_SCHEMA_ENV}=1 "
        ".venv/bin/pytest tests/test_chart.py -k follows_the_settings_model` and commit the file"
    )


# The settings' validators as JSON-schema patterns (proxy/settings.py): each value below the loader refuses,
# and the schema generated from the settings refuses it too, naming where.
REFUSED_BY_BOTH = [
    ('config.telemetry.metrics_path="metrics"', "/config/telemetry/metrics_path"),
    ('config.definitions.path="flags/definitions"', "/config/definitions/path"),
    ('config.definitions.aliases=["/flags/old","api/old"]', "/config/definitions/aliases/1"),
    (
        'config.upstream.url="http://user:s3cret@legacy:8000"',
        "/config/upstream/url",
    ),  # in clear in the ConfigMap
    ('config.upstream.url="ftp://legacy"', "/config/upstream/url"),
    ('config.upstream.url="http://legacy:8000/?x=1"', "/config/upstream/url"),
    ('config.telemetry.otlp_endpoint="http://user:s3cret@collector:4318"', "/config/telemetry/otlp_endpoint"),
    ('config.telemetry.otlp_endpoint="http://collector:4318/?tenant=a"', "/config/telemetry/otlp_endpoint"),
    ('config.rate_limits.default="lots"', "/config/rate_limits/default"),
    ('config.rate_limits.etag="600/min"', "/config/rate_limits/etag"),
    ('config.rate_limits.team_overrides={"42":"often"}', "/config/rate_limits/team_overrides/42"),
    ('config.rate_limits.team_overrides={"acme":"10/second"}', "'acme'"),
    ('config.upstream.trusted_proxies=["10.0.0.0/33"]', "/config/upstream/trusted_proxies/0"),
    ('config.upstream.trusted_proxies=["10.0.0.256"]', "/config/upstream/trusted_proxies/0"),
    ('config.layout.team_key="team"', "/config/layout/team_key"),
    ('config.layout.billing_sdk_key="sdk:{library}"', "/config/layout/billing_sdk_key"),
    ('config.layout.billing_dedupe_key="batch"', "/config/layout/billing_dedupe_key"),
    ('config.server_header=" gunicorn"', "/config/server_header"),
]
# ... and values near those edges the loader accepts, which the schema must not refuse.
ACCEPTED_BY_BOTH = [
    'config.rate_limits.default="10 Per 2 Minutes; 5/second"',
    'config.rate_limits.team_overrides={"42":"1/SECOND"}',
    'config.upstream.trusted_proxies=["fe80::/10","10.0.0.1","10.0.0.0/255.0.0.0","::ffff:10.0.0.0/104"]',
    'config.upstream.url="HTTPS://legacy.example:8443/prefix/@v1"',
    'config.telemetry.otlp_endpoint="http://[fd00::1]:4318/otlp"',
    'config.layout.team_key="t:{token}:v2"',
    'config.server_header="nginx/1.25 (x)"',
    'config.telemetry={"metrics_enabled":false,"metrics_path":"/flags/definitions"}',  # no route when off
    'config.definitions={"aliases":[],"path":"/api/feature_flag/local_evaluation"}',
    'config.telemetry={"worker_metrics_port":8082}',
    'config.telemetry={"worker_metrics_port":8070}',
]


@pytest.mark.parametrize(("setting", "where"), REFUSED_BY_BOTH)
def test_the_schema_refuses_what_the_settings_validators_refuse(
    helm: str, setting: str, where: str, tmp_path: Path
) -> None:
    """The schema is generated from the settings model, patterns included: `helm install` refuses what the pod
    would refuse at its start (before, helm succeeded and the pods crash-looped)."""
    unchecked = template(helm, *MINIMAL, "--skip-schema-validation", "--set-json", setting)
    assert unchecked.returncode == 0, unchecked.stderr
    config = one(load_manifests(unchecked.stdout), "ConfigMap")["data"]["config.yaml"]
    with pytest.raises(AssertionError, match="invalid configuration"):
        assert_check_config(config, tmp_path)
    result = template(helm, *MINIMAL, "--set-json", setting)
    assert result.returncode != 0
    assert "schema" in result.stderr
    assert where in result.stderr
    assert "s3cret" not in result.stderr or "user:s3cret" in setting


@pytest.mark.parametrize("setting", ACCEPTED_BY_BOTH)
def test_the_schema_accepts_what_the_settings_validators_accept(
    helm: str, setting: str, tmp_path: Path
) -> None:
    result = template(helm, *MINIMAL, "--set-json", setting)
    assert result.returncode == 0, result.stderr
    assert_check_config(one(load_manifests(result.stdout), "ConfigMap")["data"]["config.yaml"], tmp_path)


@pytest.mark.parametrize(
    "setting",
    [
        'config.telemetry.metrics_path="metrics"',
        'config.upstream.url="http://user:s3cret@legacy:8000"',  # a credential, in the ConfigMap
        'config.upstream.url="ftp://legacy"',
        'config.rate_limits.default="lots"',
        'config.upstream.trusted_proxies=["10.0.0.0/33"]',
        'config.layout.team_key="team"',
        'config.definitions.path="/_liveness"',  # already the route of the health probes
        "config.telemetry.worker_metrics_port=8080",  # containerPort
    ],
)
def test_what_the_chart_renders_the_app_accepts(helm: str, setting: str, tmp_path: Path) -> None:
    """Refused at `helm install`, or accepted by the pod: never a successful install whose pods crash-loop."""
    result = template(helm, *MINIMAL, "--set-json", setting)
    if result.returncode != 0:
        return
    config = one(load_manifests(result.stdout), "ConfigMap")["data"]["config.yaml"]
    assert_check_config(config, tmp_path)


@pytest.mark.parametrize("mode", ["fleet", "sidecar"])
def test_a_long_name_override_still_makes_valid_volume_names(helm: str, mode: str, tmp_path: Path) -> None:
    """Volume names are DNS labels: the -tmp volume of a 53+ character nameOverride was 67 characters."""
    name = "a" * 52 + "-" + "b" * 10  # 63, the longest the chart's name may be
    if mode == "fleet":
        result = template(
            helm, "--values", str(CHART / "examples" / "fleet.yaml"), "--set", f"nameOverride={name}"
        )
    else:  # in the app's pod, through the example app chart
        shutil.copytree(CHART, tmp_path / "helm")
        chart = tmp_path / "helm" / "examples" / "legacy-app"
        built = run(helm, "dependency", "build", str(chart))
        assert built.returncode == 0, built.stdout + built.stderr
        result = template(helm, "--set", f"edge-proxy.nameOverride={name}", chart=chart)
    assert result.returncode == 0, result.stderr
    spec = pod_spec(load_manifests(result.stdout))
    names = {volume["name"] for volume in spec["volumes"]}
    assert {mount["name"] for mount in proxy_container(spec)["volumeMounts"]} <= names
    assert any(volume.endswith("-config-tmp") for volume in names)
    for volume in names:
        assert len(volume) <= 63, volume
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", volume), volume


def test_a_probe_with_another_handler_loses_the_default_httpget(helm: str) -> None:
    """Values merging keeps the default httpGet beside an exec override: two handlers, refused by the API."""
    result = template(helm, *MINIMAL, "--set-json", 'readinessProbe={"exec":{"command":["true"]}}')
    assert result.returncode == 0, result.stderr
    [container] = one(load_manifests(result.stdout), "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"] == {
        "exec": {"command": ["true"]},
        "periodSeconds": 5,
        "timeoutSeconds": 2,
        "failureThreshold": 2,
    }
    assert container["livenessProbe"]["httpGet"] == {"path": "/_liveness", "port": "health"}


def test_a_fleet_answering_health_on_its_health_port_only_is_probed_there_for_readiness_too(
    helm: str,
) -> None:
    result = template(helm, *MINIMAL, "--set", "config.health_port_only=true")
    assert result.returncode == 0, result.stderr
    [container] = one(load_manifests(result.stdout), "Deployment")["spec"]["template"]["spec"]["containers"]
    assert {
        container[kind]["httpGet"]["port"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    } == {"health"}


def test_without_a_health_port_every_probe_is_on_the_clients_port(helm: str, tmp_path: Path) -> None:
    result = template(helm, *MINIMAL, "--set-json", "healthPort=null")
    assert result.returncode == 0, result.stderr
    manifests = load_manifests(result.stdout)
    [container] = one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [port["name"] for port in container["ports"]] == ["http"]
    assert {
        container[kind]["httpGet"]["port"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    } == {"http"}
    config = one(manifests, "ConfigMap")["data"]["config.yaml"]
    assert "health_port" not in yaml.safe_load(config)
    assert_check_config(config, tmp_path)


def test_an_empty_aliases_list_leaves_only_the_definitions_path_in_the_httproute(helm: str) -> None:
    result = template(
        helm,
        "--values",
        str(CHART / "examples" / "fleet-httproute.yaml"),
        "--set-json",
        "config.definitions.aliases=[]",
    )
    assert result.returncode == 0, result.stderr
    [rule] = one(load_manifests(result.stdout), "HTTPRoute")["spec"]["rules"]
    assert [match["path"]["value"] for match in rule["matches"]] == ["/flags/definitions"]
