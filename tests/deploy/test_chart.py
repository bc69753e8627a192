"""The Helm chart charts/remem, checked with Helm's own code, Kubernetes' schemas and the
real services. There is no Kubernetes cluster here, so `helm install` and `helm test`
themselves cannot run; everything short of a kubelet does:

* Render and lint with Helm itself: helm-python-sdk is Helm v4's Go packages compiled into
  libhelm_c and called through ctypes (no helm binary involved). `Chart.render` is
  `helm template`, `lint(strict=True)` is `helm lint --strict`; both enforce
  values.schema.json.
* Every manifest rendered from values.yaml and from each ci/*-values.yaml must pass
  kubernetes-validate --strict for KUBE_VERSION (the newest Kubernetes it has schemas for):
  an unknown field, a wrong type or a missing required field fails, and so does a kind it
  has no schema for. The two kinds that are CRDs, ServiceMonitor and PrometheusRule, are
  validated against the prometheus-operator CRD schemas as
  cloudcoil-models-prometheus-operator generates them into pydantic models, strictly: the
  model must dump back to exactly the rendered document (pydantic drops a field it does not
  know, so any difference is one).
* What the chart promises: the page servers' preStop drain, a schema that refuses bad
  values, monitoring objects only when asked for, scrape jobs the alert rules select by,
  names within Kubernetes' limits.
* The wiring, with the real services as processes on loopback: each container's rendered
  environment (downward API fields given plausible values, ports moved to free loopback
  ports, mount paths into a temporary folder) must be accepted by the service's own config
  parser; and with Curve keys made by `remem keys` and laid out exactly as each pod's Secret
  volume items say, placement, a page server, the mirror and the client start and talk to
  each other, `helm test`'s `remem status` answers and a page server's preStop drain ends.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import cloudcoil.models.prometheus_operator.v1 as prometheus_operator
import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from pydantic import BaseModel
from remem_common.testing import ServiceProcess, scrape_metrics, start_service

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "remem"
# The newest Kubernetes kubernetes-validate 1.37 has schemas for; lint checks against it too.
KUBE_VERSION = "1.37.0"
RELEASE = "remem"
NAMESPACE = "remem"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
VALUES_NAMES = ["default", *(path.name.removesuffix("-values.yaml") for path in CI_VALUES)]
REMEM = Path(sys.executable).with_name("remem")
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
# remem from this virtualenv first, as the images have it on PATH.
BIN_PATH = f"{REMEM.parent}:{SYSTEM_PATH}"
# nbdinfo, nbdsh: Debian's, with the system Python's libnbd bindings.
NBD_TOOLS = {"PATH": SYSTEM_PATH}
CRD_MODELS: dict[tuple[str, str], type[BaseModel]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): prometheus_operator.ServiceMonitor,
    ("monitoring.coreos.com/v1", "PrometheusRule"): prometheus_operator.PrometheusRule,
}
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")
# What the downward API would give a pod here (IPv4 pod IP: loopback, where tests run).
POD_FIELDS = {
    "metadata.uid": "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9",
    "status.podIP": "127.0.0.1",
    "spec.nodeName": "node-a",
    "metadata.labels['topology.kubernetes.io/zone']": "zone-a",
}
WAIT_SECONDS = 30.0

Manifest = dict[str, Any]


# -- rendering ----------------------------------------------------------------------------


def load_values(name: str) -> dict[str, Any]:
    if name == "default":
        return {}
    values: dict[str, Any] = yaml.safe_load((CHART / "ci" / f"{name}-values.yaml").read_text())
    return values


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict[str, Any], release: str = RELEASE) -> list[Manifest]:
    """`helm template`: every object the chart renders, NOTES.txt aside."""
    rendered = chart.render(values, name=release, namespace=NAMESPACE)
    manifests: list[Manifest] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        manifests.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return manifests


def find(manifests: list[Manifest], kind: str, component: str | None = None) -> list[Manifest]:
    return [
        doc
        for doc in manifests
        if doc["kind"] == kind
        and (
            component is None
            or doc["metadata"]["labels"].get("app.kubernetes.io/component") == component
        )
    ]


def one(manifests: list[Manifest], kind: str, component: str | None = None) -> Manifest:
    found = find(manifests, kind, component)
    assert len(found) == 1, f"expected one {kind} {component or ''}, got {len(found)}"
    return found[0]


def pod_spec(doc: Manifest) -> dict[str, Any]:
    spec: dict[str, Any] = doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]
    return spec


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def validate(doc: Manifest) -> None:
    """kubernetes-validate --strict, or the CRD's schema for the prometheus-operator kinds."""
    what = f"{doc['kind']}/{doc['metadata']['name']}"
    model = CRD_MODELS.get((doc["apiVersion"], doc["kind"]))
    if model is not None:
        parsed = model.model_validate(doc)
        dumped = parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
        assert dumped == doc, f"{what}: fields or values its CRD schema does not define"
        return
    try:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
        path = "/".join(str(part) for part in getattr(exc, "path", []))
        pytest.fail(f"{what}: {exc.message} (at {path or '.'})")


@pytest.mark.parametrize("values_name", VALUES_NAMES)
def test_chart_renders_lints_and_validates(chart: helm.Chart, values_name: str) -> None:
    values = load_values(values_name)
    report = helm.lint(
        CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}", namespace=NAMESPACE
    )
    # Severity 1 is information (e.g. "icon is recommended"); warnings fail like --strict.
    findings = [m for m in report["messages"] if m["severity"] >= 2]
    assert not findings and not report["errors"], report
    manifests = render(chart, values)
    kinds = {doc["kind"] for doc in manifests}
    assert {"Deployment", "Service", "PodDisruptionBudget", "Pod"} <= kinds
    assert kinds & {"StatefulSet", "DaemonSet"}
    for doc in manifests:
        validate(doc)


def test_chart_versions_and_images(chart: helm.Chart) -> None:
    assert chart.metadata["version"] == "0.1.0"
    assert chart.metadata["appVersion"] == "0.1.0"
    images = {
        c["image"] for doc in render(chart, {}) if doc["kind"] in WORKLOADS
        for c in containers(pod_spec(doc))
    }  # fmt: skip
    assert images == {
        f"ghcr.io/remem/remem-{service}:0.1.0"
        for service in ("placement", "pageserver", "client", "mirror")
    }


# -- what the chart promises --------------------------------------------------------------


@pytest.mark.parametrize(
    ("values_name", "kind"), [("default", "StatefulSet"), ("daemonset-pageservers", "DaemonSet")]
)
def test_pageserver_prestop_drains(chart: helm.Chart, values_name: str, kind: str) -> None:
    values = load_values(values_name)
    manifests = render(chart, values)
    other = {"StatefulSet": "DaemonSet", "DaemonSet": "StatefulSet"}[kind]
    assert not find(manifests, other, "pageserver")
    spec = pod_spec(one(manifests, kind, "pageserver"))
    (container,) = spec["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["sh", "-c"]
    assert 'exec remem drain "$REMEM_PAGESERVER_SERVER_ID" --deadline' in command[2]
    match = re.search(r"--deadline (\d+)", command[2])
    assert match is not None
    deadline = int(match.group(1))
    assert deadline == values.get("pageserver", {}).get("drainSeconds", 600)
    # The kubelet kills the pod at the end of the grace period, preStop included.
    assert spec["terminationGracePeriodSeconds"] > deadline
    env = {e["name"] for e in container["env"]}
    assert {
        "REMEM_PLACEMENT_ENDPOINT",
        "REMEM_ADMIN_CURVE_SECRET_KEY",
        "REMEM_ADMIN_PLACEMENT_PUBLIC_KEY",
    } <= env
    keys = next(v for v in spec["volumes"] if v["name"] == "keys")
    assert {"admin.key_secret", "placement.key"} <= {i["path"] for i in keys["secret"]["items"]}


BAD_VALUES = {
    "replicas-string": {"pageserver": {"replicas": "two"}},
    "unknown-kind": {"pageserver": {"kind": "Deployment"}},
    "typo-key": {"pagesever": {"replicas": 3}},
    "no-copies": {"copies": 0},
    "not-an-nbd-device": {"client": {"nbdDevice": "/dev/sda; reboot"}},
    "volume-out-of-range": {"client": {"volumes": {"node-a": 2**32}}},
    "bad-tenant": {"client": {"tenant": "no spaces"}},
    "env-not-remem": {"placement": {"env": {"LD_PRELOAD": "/tmp/x.so"}}},
    "storage-kind": {"client": {"storage": {"kind": "nfs"}}},
}


@pytest.mark.parametrize("bad", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_schema_rejects_bad_values(chart: helm.Chart, bad: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(bad)
    with pytest.raises(helm.HelmValuesError):
        chart.render(bad, name=RELEASE, namespace=NAMESPACE)
    report = helm.lint(CHART, bad, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert any(m["severity"] == 3 for m in report["messages"]), report


def test_monitoring_objects_only_when_enabled(chart: helm.Chart) -> None:
    defaults = render(chart, {})
    assert not find(defaults, "ServiceMonitor")
    assert not find(defaults, "PrometheusRule")
    enabled = render(chart, load_values("monitoring"))
    assert one(enabled, "ServiceMonitor")["metadata"]["labels"]["release"] == "monitoring"
    assert one(enabled, "PrometheusRule")["metadata"]["labels"]["release"] == "monitoring"


def relabel(rules: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, str]:
    """Prometheus's `replace` relabeling (the only action the chart uses)."""
    labels = dict(labels)
    for rule in rules:
        assert rule.get("action", "replace") == "replace"
        source = ";".join(labels.get(name, "") for name in rule.get("sourceLabels", []))
        match = re.fullmatch(rule.get("regex", "(.*)"), source)
        if match:
            replacement = re.sub(r"\$(\d+)", r"\\\1", rule.get("replacement", "$1"))
            labels[rule["targetLabel"]] = match.expand(replacement)
    return labels


def test_servicemonitor_scrapes_every_job_the_alerts_use(chart: helm.Chart) -> None:
    manifests = render(chart, load_values("monitoring"))
    monitor = one(manifests, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    jobs = set()
    for service in find(manifests, "Service"):
        labels = service["metadata"]["labels"]
        assert selector.items() <= labels.items(), service["metadata"]["name"]
        ports = {p["name"] for p in service["spec"]["ports"]}
        meta = {
            "__meta_kubernetes_service_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k): v
            for k, v in labels.items()
        }
        meta["__meta_kubernetes_pod_node_name"] = "node-a"
        meta["job"] = service["metadata"]["name"]  # the operator's default
        for endpoint in monitor["spec"]["endpoints"]:
            if endpoint["port"] in ports:
                scraped = relabel(endpoint.get("relabelings", []), meta)
                assert scraped["node"] == "node-a"
                jobs.add(scraped["job"])
    alerts = (CHART / "files" / "alerts.yaml").read_text()
    wanted = set(re.findall(r'job="([^"]+)"', alerts))
    assert wanted, "files/alerts.yaml selects no job"
    assert wanted <= jobs, f"no scrape job for {wanted - jobs}"
    assert jobs == {"remem-placement", "remem-pageserver", "remem-client", "remem-mirror"}


def test_prometheusrule_carries_the_alert_groups(chart: helm.Chart) -> None:
    rule = one(render(chart, load_values("monitoring")), "PrometheusRule")
    alerts = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]


def test_dashboard_configmap_for_the_grafana_sidecar(chart: helm.Chart) -> None:
    config_map = one(render(chart, {}), "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    assert json.loads(config_map["data"]["remem.json"]) == dashboard
    assert not find(render(chart, {"dashboard": {"enabled": False}}), "ConfigMap")


def test_names_fit_with_the_longest_release_name(chart: helm.Chart) -> None:
    release = "r" * 53  # Helm's limit for a release name
    manifests = render(chart, {}, release=release)
    dns_label = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    for doc in manifests:
        name = doc["metadata"]["name"]
        assert len(name) <= 63 and dns_label.match(name), name
        # StatefulSets and DaemonSets label their pods NAME-<10 character hash>.
        if doc["kind"] in ("StatefulSet", "DaemonSet"):
            assert len(name) <= 52, name
        for value in doc["metadata"]["labels"].values():
            assert len(value) <= 63, value
        validate(doc)
    services = {doc["metadata"]["name"] for doc in find(manifests, "Service")}
    statefulset = one(manifests, "StatefulSet", "pageserver")
    assert statefulset["spec"]["serviceName"] in services
    pageserver_env = {
        e["name"]: e.get("value") for e in pod_spec(statefulset)["containers"][0]["env"]
    }
    host = pageserver_env["REMEM_PAGESERVER_PLACEMENT"].removeprefix("tcp://").split(":")[0]
    assert host in services


def test_helm_test_pod_asks_placement(chart: helm.Chart) -> None:
    manifests = render(chart, {})
    pod = one(manifests, "Pod", "test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    assert container["command"][:2] == ["remem", "status"]
    env = {e["name"]: e["value"] for e in container["env"]}
    placement = one(manifests, "Service", "placement")
    zmq_port = next(p["port"] for p in placement["spec"]["ports"] if p["name"] == "zmq")
    expected = f"tcp://{placement['metadata']['name']}:{zmq_port}"
    assert env["REMEM_PLACEMENT_ENDPOINT"] == expected


def test_client_swap_is_attached_by_the_only_privileged_container(chart: helm.Chart) -> None:
    spec = pod_spec(one(render(chart, {}), "DaemonSet", "client"))
    # Native sidecars: the NBD server and the mirror outlive the container that swaps.
    assert [c["name"] for c in spec["initContainers"]] == ["mirror", "client"]
    assert all(c["restartPolicy"] == "Always" for c in spec["initContainers"])
    (attach,) = spec["containers"]
    privileged = [c["name"] for c in containers(spec) if c["securityContext"].get("privileged")]
    assert privileged == ["attach"]
    client = spec["initContainers"][1]
    assert client["securityContext"]["capabilities"] == {
        "drop": ["ALL"],
        "add": ["IPC_LOCK", "SYS_RESOURCE"],
    }
    script = attach["args"][0]
    client_env = {e["name"]: e.get("value") for e in client["env"]}
    socket_path = client_env["REMEM_CLIENT_NBD_SOCKET"]
    assert f"nbd-client -unix {socket_path} " in script
    assert f"-N {client_env['REMEM_CLIENT_EXPORT_NAME']}" in script
    assert re.search(r"detach\(\) \{\n\s+echo [^\n]*\n\s+if swapoff", script)
    assert "trap detach TERM" in script


# -- the rendered pods as processes -------------------------------------------------------


def shell_scripts(spec: dict[str, Any]) -> list[str]:
    scripts = []
    for container in containers(spec):
        command = [*container.get("command", []), *container.get("args", [])]
        if command[:2] == ["sh", "-c"]:
            scripts.append(command[2])
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {})
        if pre_stop.get("command", [])[:2] == ["sh", "-c"]:
            scripts.append(pre_stop["command"][2])
    return scripts


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion from the variables defined before."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), value)


def container_env(pod_name: str, container: dict[str, Any], node: str = "node-a") -> dict[str, str]:
    """A container's environment as the kubelet would give it."""
    fields = {**POD_FIELDS, "metadata.name": pod_name, "spec.nodeName": node}
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = expand(entry["value"], env)
        else:
            env[entry["name"]] = fields[entry["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def service_of(container: dict[str, Any]) -> str | None:
    """The remem service a container runs, from its image's ENTRYPOINT or its script."""
    command = [*container.get("command", []), *container.get("args", [])]
    if not command:
        repository: str = container["image"].rsplit(":", 1)[0]
        return repository.rsplit("/", 1)[-1].removeprefix("remem-")
    match = re.search(r"\bexec remem (\w+)\s*$", command[-1])
    return match[1] if match else None


def run_container(
    container: dict[str, Any], env: dict[str, str], extra: list[str], shims: Path
) -> subprocess.CompletedProcess[str]:
    """Run the container's command (or image ENTRYPOINT `remem SERVICE`) here, with `extra`
    appended to the remem command line (a `remem` on PATH adds it in scripts)."""
    service = service_of(container)
    assert service is not None
    shim = shims / "remem"
    shim.write_text(f'#!/bin/sh\nexec {REMEM} "$@" {" ".join(extra)}\n')
    shim.chmod(0o755)
    command = [*container.get("command", []), *container.get("args", [])]
    argv = command or [str(REMEM), service, *extra]
    full_env = {"PATH": f"{shims}:{BIN_PATH}", "HOME": str(shims), **env}
    return subprocess.run(argv, env=full_env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("values_name", VALUES_NAMES)
def test_every_service_accepts_its_rendered_environment(
    chart: helm.Chart, values_name: str, tmp_path: Path
) -> None:
    values = load_values(values_name)
    volumes = values.get("client", {}).get("volumes", {})
    node = next(iter(volumes), "node-a")
    checked = set()
    for doc in render(chart, values):
        if doc["kind"] not in WORKLOADS:
            continue
        spec = pod_spec(doc)
        for script in shell_scripts(spec):
            result = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
            assert result.returncode == 0, f"{script}\n{result.stderr}"
        for container in containers(spec):
            service = service_of(container)
            if service is None:
                continue
            env = container_env(f"{doc['metadata']['name']}-0", container, node)
            result = run_container(container, env, ["--print-config"], tmp_path)
            assert result.returncode == 0, f"{service}: {result.stderr}"
            config = json.loads(result.stdout)
            prefix = f"REMEM_{service.upper()}_"
            unknown = {
                name for name in env if name.startswith(prefix)
                and name.removeprefix(prefix).lower() not in config
            }  # fmt: skip
            assert not unknown, f"{service} has no setting for {unknown}"
            checked.add(service)
            if service == "client":
                expected = volumes.get(node)
                if expected is None:
                    cksum = subprocess.run(
                        ["cksum"], input=node, capture_output=True, text=True, check=True
                    )
                    expected = int(cksum.stdout.split()[0])
                assert config["volume"] == expected
    client_enabled = values.get("client", {}).get("enabled", True)
    assert checked == {"placement", "pageserver"} | (
        {"client", "mirror"} if client_enabled else set()
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Pod:
    """One rendered pod laid out here: its volumes as folders (Secret volumes holding the
    items the pod asks for, from the `remem keys` folder), its ports as free loopback ports."""

    def __init__(
        self, doc: Manifest, root: Path, secret: Path, index: int = 0, node: str = "node-a"
    ) -> None:
        template = doc if doc["kind"] == "Pod" else doc["spec"]["template"]
        # A controller's pods are NAME-0, NAME-1, ... (a StatefulSet's, on different nodes).
        self.name = doc["metadata"]["name"] + ("" if doc["kind"] == "Pod" else f"-{index}")
        self.node = node
        self.spec = pod_spec(doc)
        self.labels: dict[str, str] = template["metadata"]["labels"]
        self.volumes: dict[str, Path] = {}
        for volume in self.spec.get("volumes", []):
            folder = root / self.name / volume["name"]
            folder.mkdir(parents=True)
            self.volumes[volume["name"]] = folder
            for item in volume.get("secret", {}).get("items", []):
                target = folder / item["path"]
                target.parent.mkdir(exist_ok=True)
                shutil.copyfile(secret / item["key"], target)
        self.ports = {
            port["containerPort"]: free_port()
            for container in containers(self.spec)
            for port in container.get("ports", [])
        }

    def container(self, name: str) -> dict[str, Any]:
        return next(c for c in containers(self.spec) if c["name"] == name)

    def env(self, name: str, services: dict[str, str]) -> dict[str, str]:
        """The container's environment, moved here: mount paths into this pod's folders,
        wildcard and pod addresses to loopback, container ports to this pod's free ports,
        Service addresses to the local ports of the pods behind them."""
        container = self.container(name)
        mounts = {m["mountPath"]: self.volumes[m["name"]] for m in container["volumeMounts"]}
        local = {}
        for key, value in container_env(self.name, container, self.node).items():
            for service, address in services.items():
                value = value.replace(service, address)
            for mount in sorted(mounts, key=len, reverse=True):
                value = value.replace(mount, str(mounts[mount]))
            value = value.replace("0.0.0.0", "127.0.0.1")
            value = re.sub(r"127\.0\.0\.1:(\d+)", self._local_port, value)
            if key.endswith("_METRICS_PORT"):
                value = str(self.ports[int(value)])
            local[key] = value
        return local

    def _local_port(self, match: re.Match[str]) -> str:
        return f"127.0.0.1:{self.ports.get(int(match[1]), match[1])}"

    def service_addresses(self, service: Manifest) -> dict[str, str]:
        """'NAME:PORT' of a Service selecting this pod, to this pod's local address."""
        if not service["spec"]["selector"].items() <= self.labels.items():
            return {}
        named = {
            p["name"]: p["containerPort"]
            for c in containers(self.spec)
            for p in c.get("ports", [])
        }  # fmt: skip
        return {
            f"{service['metadata']['name']}:{port['port']}": (
                f"127.0.0.1:{self.ports[named[port['targetPort']]]}"
            )
            for port in service["spec"]["ports"]
        }


def spawn(
    pod: Pod, name: str, services: dict[str, str], running: list[ServiceProcess]
) -> ServiceProcess:
    """Start a container's service with exactly its environment (`env -i`: not this test
    process's, where tests/conftest.py turns Curve off), wait for its ready line."""
    container = pod.container(name)
    env = {"PATH": BIN_PATH, "HOME": str(pod.volumes[next(iter(pod.volumes))])}
    env |= pod.env(name, services)
    prefix = ["env", "-i", *(f"{k}={v}" for k, v in env.items())]
    command = [*container.get("command", []), *container.get("args", [])]
    service = service_of(container)
    assert service is not None
    if command:
        # The container's own script, which execs `remem SERVICE` from PATH; the
        # `python -m remem_cli SERVICE` start_service appends only become its unused "$@".
        prefix += [*command, "sh"]
    process = start_service(f"{pod.name}/{name}", [service], prefix=prefix, timeout=WAIT_SECONDS)
    running.append(process)
    return process


def stop_all(running: list[ServiceProcess]) -> None:
    """SIGTERM to every process at once (as to a deleted release), then wait for each."""
    for process in running:
        if process.proc.poll() is None:
            process.proc.send_signal(signal.SIGTERM)
    for process in running:
        process.stop()


def run_tool(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        env={"PATH": BIN_PATH, **env},
        capture_output=True,
        text=True,
        timeout=WAIT_SECONDS + 30,
    )


def nbd_uri(pod: Pod, services: dict[str, str]) -> str:
    env = pod.env("client", services)
    return f"nbd+unix:///{env['REMEM_CLIENT_EXPORT_NAME']}?socket={env['REMEM_CLIENT_NBD_SOCKET']}"


def wait_for(what: str, done: Any) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)  # polling a status or a metric, not waiting blindly


PAGES = b"remem chart " * (4 * 4096 // 12) + b"1234"  # four pages
OFFSET = 1 << 20


def test_rendered_pods_work_together_with_curve(chart: helm.Chart) -> None:
    """The default values as processes: placement, the StatefulSet's page servers (one a
    node each), the mirror and the client, with keys laid out as each pod's Secret volume
    items say. Pages written through the NBD export survive the preStop drain of a page
    server and its stop; `helm test`'s command answers."""
    manifests = render(chart, {})
    defaults = chart.values
    with ExitStack() as stack:
        # Short paths: the mirror's and the client's Unix sockets live below this folder.
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="remem-chart-")))
        running: list[ServiceProcess] = []
        stack.callback(stop_all, running)
        secret = root / "secret"
        for name, role, tenant in [
            ("placement", "placement", None),
            ("pageserver", "pageserver", None),
            ("mirror", "mirror", None),
            ("client", "client", defaults["client"]["tenant"]),
            ("admin", "admin", None),
        ]:
            argv = [str(REMEM), "keys", "--dir", str(secret), name, "--role", role]
            subprocess.run(
                argv + (["--tenant", tenant] if tenant else []), check=True, capture_output=True
            )
        placement = Pod(one(manifests, "Deployment", "placement"), root, secret)
        statefulset = one(manifests, "StatefulSet", "pageserver")
        pageservers = [
            Pod(statefulset, root, secret, index, node=f"node-{index}")
            for index in range(statefulset["spec"]["replicas"])
        ]
        client = Pod(one(manifests, "DaemonSet", "client"), root, secret)
        test = Pod(one(manifests, "Pod", "test"), root, secret)
        services: dict[str, str] = {}
        for service in find(manifests, "Service"):
            services |= placement.service_addresses(service)
        assert services, "no Service selects the placement pod"

        spawn(placement, "placement", services, running)
        started = [spawn(pod, "pageserver", services, running) for pod in pageservers]
        server_ids = [process.ready["server_id"] for process in started]
        assert server_ids[0] == f"{pageservers[0].name}.{POD_FIELDS['metadata.uid']}"
        assert [process.ready["zone"] for process in started] == [p.node for p in pageservers]

        # `helm test`: the test pod's command, with its environment and its keys.
        (status_container,) = test.spec["containers"]
        status_env = test.env("status", services)

        def registered() -> bool:
            status = run_tool([*status_container["command"], "--json"], status_env)
            assert status.returncode == 0, status.stderr
            live = {s["server_id"] for s in json.loads(status.stdout)["servers"]}
            return set(server_ids) <= live

        wait_for("every page server to register", registered)
        assert run_tool(status_container["command"], status_env).returncode == 0

        # The mirror and the client, wired to each other, to placement and to the page
        # servers over Curve: pages go out and come back.
        spawn(client, "mirror", services, running)
        nbd = spawn(client, "client", services, running)
        wait_for(
            "the client to attach its mirror",
            lambda: scrape_metrics(nbd.ready["metrics"]).get("client_mirror_up") == 1,
        )
        uri = nbd_uri(client, services)
        info = run_tool(["nbdinfo", "--json", uri], NBD_TOOLS)
        assert info.returncode == 0, info.stderr + nbd.log()
        size = json.loads(info.stdout)["exports"][0]["export-size"]
        assert size == defaults["client"]["sizeMiB"] << 20
        write = run_tool(["nbdsh", "-u", uri, "-c", f"h.pwrite({PAGES!r}, {OFFSET})"], NBD_TOOLS)
        assert write.returncode == 0, write.stderr + nbd.log()

        # What the kubelet does to a page server in a rolling update: preStop (drain
        # through placement with the admin key), then SIGTERM.
        pre_stop = pageservers[0].container("pageserver")["lifecycle"]["preStop"]["exec"]
        drain = run_tool(pre_stop["command"], pageservers[0].env("pageserver", services))
        assert drain.returncode == 0, drain.stderr
        assert f"{server_ids[0]} drained" in drain.stderr
        started[0].stop()
        read = run_tool(
            ["nbdsh", "-u", uri, "-c", f"assert h.pread({len(PAGES)}, {OFFSET}) == {PAGES!r}"],
            NBD_TOOLS,
        )
        assert read.returncode == 0, read.stderr + nbd.log()
