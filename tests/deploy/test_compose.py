"""deploy/compose.yaml: valid for the compose tools, and wired the way remem needs it.

Validation uses what a fresh machine gets from PyPI (the dev extra): podman-compose's
`config` resolves the file as `podman-compose up` would (merge keys, interpolation,
profiles; with --dry-run it needs no container engine), and compose-spec (bindings of the Rust
`compose_spec` crate) checks the result against the Compose Specification: unknown keys,
wrong types, bad durations, undeclared networks and volumes. The wiring checks run the real
tools behind it: each service's own `--print-config` over the environment compose gives it
(on top of its image's), the `keys` service's script with the real `remem keys`, and promtool
on the Prometheus configuration. Bringing the stack up is `make compose-test`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_spec import PyCompose
from remem_common.security import read_identity
from remem_pageserver.store import arena_layout

from .test_images import env_of, parse_dockerfile, run_print_config, service_image

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
GRAFANA = DEPLOY / "grafana" / "provisioning"
KEYS_DIR = "/etc/remem/keys"
PAGE_SIZE = 4096
# Services in the host's network namespace: the host's nbd-client must reach the client, and
# whatever scrapes or serves beside it is there too.
HOST_NETWORK = {"client", "mirror", "prometheus", "grafana"}


def podman_compose() -> str:
    found = shutil.which("podman-compose", path=str(Path(sys.executable).parent)) or (
        shutil.which("podman-compose")
    )
    assert found, "podman-compose is missing: `make install` installs it (dev extra)"
    return found


def resolve(*profiles: str) -> str:
    """`podman-compose config`: the file as `up` would run it, as YAML text."""
    # --dry-run: no podman needed (without it podman-compose asks `podman --version` first).
    args = [podman_compose(), "--dry-run", "-f", str(COMPOSE)]
    for profile in profiles:
        args += ["--profile", profile]
    # Only PATH from this environment: a REMEM_TAG or REMEM_NBD_PORT set here must not
    # change what is checked.
    result = subprocess.run(
        [*args, "config"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        check=False,
        cwd=DEPLOY,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def resolved_text() -> str:
    return resolve("grafana")


@pytest.fixture(scope="module")
def compose(resolved_text: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(resolved_text)
    return loaded


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def kind_of(service: dict[str, Any]) -> str | None:
    """pageserver, placement, client or mirror for a remem service (by its image)."""
    match = re.fullmatch(r"localhost/remem-(\w+):[\w.-]+", service.get("image", ""))
    if match and match.group(1) in ("pageserver", "placement", "client", "mirror"):
        return match.group(1)
    return None


def remem_services(compose: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (kind, service) for every long-running remem service (not the keys job)."""
    found = {}
    for name, service in services(compose).items():
        kind = kind_of(service)
        if kind is not None and "entrypoint" not in service:
            found[name] = (kind, service)
    return found


def effective_config(kind: str, service: dict[str, Any]) -> dict[str, Any]:
    """The service's --print-config with its image's environment and compose's on top."""
    image_env = env_of(service_image(kind))
    env = {k: v for k, v in image_env.items() if k.startswith("REMEM_")}
    env.update({k: str(v) for k, v in (service.get("environment") or {}).items()})
    return run_print_config(kind, [], env)


@pytest.fixture(scope="module")
def configs(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> effective config of every long-running remem service (one run each)."""
    return {
        name: effective_config(kind, service)
        for name, (kind, service) in remem_services(compose).items()
    }


def published(service: dict[str, Any]) -> dict[int, tuple[str, int]]:
    """container port -> (host address, host port) of `ports: ["HOST:PUB:CONTAINER"]`."""
    found = {}
    for spec in service.get("ports", []):
        host, public, private = str(spec).split(":")
        found[int(private)] = (host, int(public))
    return found


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Mount target -> source (a named volume or a path relative to deploy/)."""
    found = {}
    for spec in service.get("volumes") or []:
        source, target = str(spec).split(":")[:2]
        found[target] = source
    return found


def port_of(endpoint: str) -> int:
    return int(endpoint.rstrip("/").rsplit(":", 1)[1])


def host_of(endpoint: str) -> str:
    return endpoint.split("://", 1)[-1].rsplit(":", 1)[0]


def size_bytes(value: str) -> int:
    """A compose byte value (`544m`, `1g`, `512k`, plain bytes)."""
    match = re.fullmatch(r"(\d+)\s*([bkmg]?)b?", str(value).lower())
    assert match, value
    return int(match.group(1)) << (10 * "bkmg".index(match.group(2) or "b"))


# -- the file is valid compose -------------------------------------------------------------


def test_compose_spec_accepts_the_resolved_file(resolved_text: str) -> None:
    parsed = PyCompose.from_yaml(resolved_text)
    parsed.validate()
    parsed.validate_networks()
    parsed.validate_volumes()
    assert set(parsed.service_names()) == {
        "keys", "placement", "pageserver-a", "pageserver-b", "pageserver-c",
        "mirror", "client", "prometheus", "grafana",
    }  # fmt: skip


def test_compose_spec_rejects_what_it_should() -> None:
    """The validator is not a YAML parser in disguise: a typo'd key and a bad duration fail."""
    bad_key = "services:\n  a:\n    image: x\n    shm_sise: 1g\n"
    bad_duration = "services:\n  a:\n    image: x\n    healthcheck:\n      interval: 10q\n"
    for text in (bad_key, bad_duration):
        with pytest.raises(ValueError):
            PyCompose.from_yaml(text).validate()


def test_grafana_is_left_out_unless_its_profile_is_asked_for() -> None:
    # make compose-test runs the stack without it: the image may not be pullable.
    default = yaml.safe_load(resolve())
    assert "grafana" not in default["services"]
    assert set(default["services"]) == set(yaml.safe_load(resolve("grafana"))["services"]) - {
        "grafana"
    }


def test_every_reference_resolves(compose: dict[str, Any]) -> None:
    volumes = set(compose.get("volumes") or {})
    networks = set(compose.get("networks") or {})
    for name, service in services(compose).items():
        for dependency in service.get("depends_on") or {}:
            assert dependency in services(compose), f"{name} depends on unknown {dependency}"
        for network in service.get("networks") or []:
            assert network in networks, f"{name}: network {network} is not declared"
        for mount in service.get("volumes") or []:
            source = str(mount).split(":")[0]
            if source.startswith((".", "/")):
                path = (DEPLOY / source).resolve()
                assert path.is_file() or path.is_dir(), f"{name}: {source} does not exist"
            else:
                assert source in volumes, f"{name}: volume {source} is not declared"


def test_every_image_is_built_from_a_dockerfile_that_exists(compose: dict[str, Any]) -> None:
    """Each localhost/remem-<service> image is services/Dockerfile's stage of that service
    (its target): an image named for one service never runs another's stage."""
    for name, service in services(compose).items():
        build = service.get("build")
        if build is None:
            continue
        context = (DEPLOY / build["context"]).resolve()
        assert context == REPO, f"{name}: the build context is the repository root"
        assert (context / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']}"
        kind = kind_of(service)
        if kind is not None:
            assert build["dockerfile"] == "services/Dockerfile", name
            assert build.get("target") == kind, f"{name}: builds stage {build.get('target')}"


# -- remem's wiring ------------------------------------------------------------------------


def test_environment_is_each_services_own_settings(
    compose: dict[str, Any], configs: dict[str, dict[str, Any]]
) -> None:
    """Only REMEM_<SERVICE>_<FLAG> names the service has, values it accepts."""
    for name, (kind, service) in remem_services(compose).items():
        config = configs[name]
        prefix = f"REMEM_{kind.upper()}_"
        for key in service.get("environment") or {}:
            assert key.startswith(prefix), f"{name}: {key} is not a {kind} setting"
            assert key[len(prefix) :].lower() in config, f"{name}: {kind} has no flag for {key}"
        # Curve everywhere: a key, and admitted keys where the service binds.
        assert config["insecure"] is False and config["curve_secret_key"], name
        if kind != "client":
            assert config["curve_authorized"] == KEYS_DIR, name


def test_networks_and_published_ports(
    compose: dict[str, Any], configs: dict[str, dict[str, Any]]
) -> None:
    all_services = services(compose)
    for name in HOST_NETWORK:
        assert all_services[name].get("network_mode") == "host", name
    host_ports: list[int] = []
    for name, service in all_services.items():
        if name in HOST_NETWORK:
            assert "ports" not in service, f"{name} is on the host network: nothing to publish"
            continue
        for private, (address, public) in published(service).items():
            # Published on the host's loopback only, at the same number as inside.
            assert (address, public) == ("127.0.0.1", private), f"{name}: {private}"
            host_ports.append(public)
    for name in ("client", "mirror"):
        config = configs[name]
        assert config["metrics_host"] == "127.0.0.1", f"{name} metrics beyond loopback"
        host_ports.append(int(config["metrics_port"]))
        listen = str(config["nbd_listen"] if name == "client" else config["listen"])
        assert host_of(listen) == "127.0.0.1", f"{name} listens beyond loopback: {listen}"
        host_ports.append(port_of(listen))
    assert len(host_ports) == len(set(host_ports)), f"a host port is taken twice: {host_ports}"


def test_page_servers_are_reachable_by_the_name_they_advertise(
    compose: dict[str, Any], configs: dict[str, dict[str, Any]]
) -> None:
    """Peers on the bridge network and the host-network client dial the same endpoint."""
    client = services(compose)["client"]
    extra_hosts = {str(e).split(":")[0]: str(e).split(":", 1)[1] for e in client["extra_hosts"]}
    client_config = configs["client"]
    placement = services(compose)["placement"]
    assert port_of(str(client_config["placement"])) in published(placement)
    assert host_of(str(client_config["placement"])) == "127.0.0.1"
    zones = set()
    pageservers = {
        name: service
        for name, (kind, service) in remem_services(compose).items()
        if kind == "pageserver"
    }
    assert len(pageservers) == 3
    for name, service in pageservers.items():
        config = configs[name]
        zones.add(config["zone"])
        advertised = str(config["advertise"])
        port = port_of(advertised)
        assert host_of(advertised) == name == service["hostname"] == config["server_id"]
        assert port == port_of(str(config["listen"])) and port in published(service)
        assert extra_hosts.get(name) == "127.0.0.1", f"the client cannot resolve {name}"
        # placement scrapes http://<hostname>:<metrics port>/metrics on the bridge network.
        assert int(config["metrics_port"]) in published(service)
        assert host_of(str(config["placement"])) == "placement"
    assert len(zones) == 3, f"page servers share a zone: {zones}"


def test_page_server_arena_fits_in_its_shm(
    compose: dict[str, Any], configs: dict[str, dict[str, Any]]
) -> None:
    for name, (kind, service) in remem_services(compose).items():
        if kind != "pageserver":
            continue
        capacity = int(configs[name]["capacity"])
        _, _, arena = arena_layout(capacity // PAGE_SIZE)
        shm = size_bytes(service["shm_size"])
        assert arena <= shm, f"{name}: arena of {arena} bytes in a {shm}-byte /dev/shm"
        assert shm - arena < 64 << 20, f"{name}: /dev/shm far larger than the arena"


def test_mirror_covers_the_client_device(configs: dict[str, dict[str, Any]]) -> None:
    client, mirror = configs["client"], configs["mirror"]
    assert client["size"] == mirror["size"]
    assert port_of(str(client["mirror"])) == port_of(str(mirror["listen"]))


def test_capabilities_and_hardening(compose: dict[str, Any]) -> None:
    for name, (kind, service) in remem_services(compose).items():
        assert service["cap_drop"] == ["ALL"], name
        assert service.get("read_only") is True, name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        expected = {"IPC_LOCK", "SYS_RESOURCE"} if kind == "client" else set()
        assert set(service.get("cap_add", [])) == expected, name
        assert service.get("privileged") is not True, name


def test_keys_job_makes_every_key_the_services_use(compose: dict[str, Any], tmp_path: Path) -> None:
    """Run the `keys` service's script with the real `remem keys` (twice: it must keep the
    keys it made), then check each service's key has the role its service needs."""
    job = services(compose)["keys"]
    assert job["entrypoint"][0] == "/bin/sh"
    script = job["command"][0].replace(KEYS_DIR, str(tmp_path))
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    made: list[dict[str, bytes]] = []
    for _ in range(2):
        result = subprocess.run(
            [*job["entrypoint"], script],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        made.append({p.name: p.read_bytes() for p in tmp_path.iterdir()})
    assert made[0] == made[1], "a second run replaced keys"
    for name, (kind, service) in remem_services(compose).items():
        assert f"keys:{KEYS_DIR}:ro" in service["volumes"], name
        assert service["depends_on"]["keys"]["condition"] == "service_completed_successfully"
        env_values = service["environment"]
        secret = Path(env_values[f"REMEM_{kind.upper()}_CURVE_SECRET_KEY"])
        identity = read_identity(tmp_path / secret.relative_to(KEYS_DIR))
        assert identity.role == kind, f"{name} runs with a {identity.role} key"
        if kind == "client":
            assert identity.tenant == env_values["REMEM_CLIENT_TENANT"]
        for flag in ("PLACEMENT_PUBLIC_KEY", "MIRROR_PUBLIC_KEY"):
            public = env_values.get(f"REMEM_{kind.upper()}_{flag}")
            if public:
                role = flag.split("_")[0].lower()
                assert read_identity(tmp_path / Path(public).relative_to(KEYS_DIR)).role == role


# -- Prometheus and Grafana ----------------------------------------------------------------


def scrape_targets() -> dict[str, set[int]]:
    """job -> the 127.0.0.1 ports Prometheus scrapes for it."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    jobs: dict[str, set[int]] = {}
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                assert host == "127.0.0.1", target
                jobs.setdefault(job["job_name"], set()).add(int(port))
    return jobs


def test_prometheus_scrapes_every_service(
    compose: dict[str, Any], configs: dict[str, dict[str, Any]]
) -> None:
    targets = scrape_targets()
    expected: dict[str, set[int]] = {}
    for name, (kind, _service) in remem_services(compose).items():
        port = int(configs[name]["metrics_port"])
        expected.setdefault(f"remem-{kind}", set()).add(port)
    assert targets == expected
    # The job names the alert rules select on.
    alerts = (REPO / "charts/remem/files/alerts.yaml").read_text()
    assert set(re.findall(r'job="(remem-[a-z]+)"', alerts)) <= set(targets)


def test_promtool_accepts_the_prometheus_configuration(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    """The configuration with its rule file where compose mounts it (promtool checks both)."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make deps` installs Debian's prometheus package"
    mounted = mounts(services(compose)["prometheus"])
    rules_source = mounted["/etc/prometheus/rules/alerts.yaml"]
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    assert config["rule_files"] == ["/etc/prometheus/rules/alerts.yaml"]
    config["rule_files"] = [str((DEPLOY / rules_source).resolve())]
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [promtool, "check", "config", str(checked)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert mounted["/etc/prometheus/prometheus.yml"] == "./prometheus/prometheus.yml"


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard(
    compose: dict[str, Any],
) -> None:
    grafana = services(compose)["grafana"]
    mounted = mounts(grafana)
    assert mounted["/etc/grafana/provisioning"] == "./grafana/provisioning"
    datasources = yaml.safe_load((GRAFANA / "datasources" / "prometheus.yaml").read_text())
    (source,) = datasources["datasources"]
    prometheus_cmd = parse_dockerfile(DEPLOY / "prometheus" / "Dockerfile")[-1].one("CMD")
    listen = re.search(r"--web\.listen-address=([\d.]+:\d+)", prometheus_cmd)
    assert listen and source["url"] == f"http://{listen.group(1)}"
    assert source["type"] == "prometheus" and source["isDefault"] is True
    providers = yaml.safe_load((GRAFANA / "dashboards" / "remem.yaml").read_text())
    (provider,) = providers["providers"]
    dashboard_dir = provider["options"]["path"]
    dashboards = [target for target in mounted if target.startswith(dashboard_dir + "/")]
    assert dashboards == [f"{dashboard_dir}/remem.json"]
    assert mounted[dashboards[0]] == "../charts/remem/files/dashboard.json"
