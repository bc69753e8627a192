"""`make compose-test`: deploy/compose.yaml built, brought up and driven from the host.

    python -m tests.system.compose_stack          (make compose-test)

1. Finds a compose tool and the engine's Docker API: Docker (`docker compose`, DOCKER_HOST
   or /var/run/docker.sock), else Podman with podman-compose (the dev extra installs it).
   With Podman and no DOCKER_HOST, it serves the Docker API itself for the run
   (`podman system service` on a private socket), so the docker SDK can drive it.
2. Builds every image, then brings the stack up without Grafana (its profile stays off: its
   image comes from a registry, which a machine without one cannot pull) and waits until
   every service's own healthcheck passes, placement lists three live page servers and
   Prometheus scrapes all six targets: "time to ready".
3. Drives it from the host through NBD: fio's nbd engine on the client's TCP port, four
   jobs, each writing (paced, so the kill lands mid-run) then verifying (crc32c) 32 MiB in a
   slab of its own. Once every slab is placed, the page server holding the most slabs is
   SIGKILLed through the Docker API. Zero verify errors required; then it waits for every
   slab to be back at two live replicas, verifies everything again, starts the killed page
   server again and waits for it to be live.
4. Tears down containers, volumes and networks, also on failure: compose down, then it
   removes (and reports) anything still labelled with the project. Images stay, so the next
   run builds from the cache.

Needs: the ports listed in deploy/compose.yaml free on 127.0.0.1, fio (make deps), and
Docker with its compose plugin or Podman (Debian: apt-get install podman). The last line is
one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import docker
import yaml
from docker.models.containers import Container

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "deploy" / "compose.yaml"
PROJECT = "remem-compose-test"
NBD_PORT = 10809
PROMETHEUS = "http://127.0.0.1:9090"
PLACEMENT_METRICS = "http://127.0.0.1:9103/metrics"
CLIENT_METRICS = "http://127.0.0.1:9102/metrics"
# Every port the stack takes on the host's loopback (deploy/compose.yaml's header lists
# them; tests/deploy/test_compose.py checks none is taken twice).
HOST_PORTS = (7000, 7101, 7102, 7103, 7300, 9090, 9102, 9103, 9104, 9111, 9112, 9113)
PAGESERVERS = ("pageserver-a", "pageserver-b", "pageserver-c")
SCRAPE_TARGETS = 6
# A service container exited this long during startup has failed (its restart policy, if the
# engine applies one, would have started it again by then).
EXITED_GRACE = 15.0
# Four fio jobs, one 64 MiB slab each: every page server holds part of the data. Writes are
# paced at 4 MiB/s per job (reads, i.e. the verify phase, are not), so the write phase lasts
# ~8 s and the kill lands inside it.
FIO_JOBS = 4
FIO_JOB_BYTES = 32 << 20
FIO_ARGS = [
    "--name=compose", f"--numjobs={FIO_JOBS}", "--rw=randwrite", "--bs=64k", "--iodepth=8",
    f"--size={FIO_JOB_BYTES >> 20}M", "--offset_increment=64M", "--rate=,4m",
    "--verify=crc32c", "--verify_fatal=1", "--group_reporting=0", "--randseed=12",
]  # fmt: skip
# The admin keypair and placement's public key, copied out of the `keys` volume for
# `remem status` run on the host (what an operator does).
ADMIN_KEYS = ("admin.key_secret", "placement.key")

T = TypeVar("T")


def say(message: str) -> None:
    print(f"compose-test: {message}", flush=True)


def wait_until(what: str, check: Callable[[], T | None], timeout: float, every: float = 0.2) -> T:
    """Poll `check` every `every` seconds until it returns something true; fail after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


# -- the engine and the compose tool -------------------------------------------------------


@dataclass
class Engine:
    """A compose command line and a Docker API client for the same engine."""

    name: str
    compose: list[str]
    api: docker.DockerClient
    service_proc: subprocess.Popen[bytes] | None = None

    def close(self) -> None:
        self.api.close()
        if self.service_proc is not None:
            self.service_proc.terminate()
            try:
                self.service_proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.service_proc.kill()
                self.service_proc.wait(timeout=10)


def _works(command: list[str]) -> bool:
    try:
        return subprocess.run(command, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _api(base_url: str) -> docker.DockerClient | None:
    try:
        client = docker.DockerClient(base_url=base_url, timeout=60)
        client.ping()
    except docker.errors.DockerException:
        return None
    return client


def find_engine(scratch: Path) -> Engine:
    """Docker with `docker compose`, else Podman with podman-compose; fails with how to get
    one when neither is there."""
    docker_host = os.environ.get("DOCKER_HOST")
    if shutil.which("docker") and _works(["docker", "compose", "version"]):
        api = _api(docker_host or "unix:///var/run/docker.sock")
        if api is not None:
            return Engine("docker", ["docker", "compose"], api)
    podman_compose = shutil.which("podman-compose", path=str(Path(sys.executable).parent))
    podman_compose = podman_compose or shutil.which("podman-compose")
    if shutil.which("podman") and podman_compose:
        if docker_host:
            api = _api(docker_host)
            if api is None:
                raise SystemExit(f"compose-test: DOCKER_HOST={docker_host} does not answer")
            return Engine("podman", [podman_compose], api)
        # The engine's Docker-compatible API, for this run only.
        sock = scratch / "podman.sock"
        proc = subprocess.Popen(
            ["podman", "system", "service", "--time=0", f"unix://{sock}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            api = wait_until("podman's Docker API", lambda: _api(f"unix://{sock}"), 60)
        except AssertionError:
            proc.kill()
            proc.wait()
            raise
        return Engine("podman", [podman_compose], api, service_proc=proc)
    raise SystemExit(
        "compose-test: no container engine. Install Docker with the compose plugin (and make"
        " its socket reachable: DOCKER_HOST or /var/run/docker.sock), or Podman (Debian:"
        " apt-get install podman; podman-compose comes with `make install`). With Podman"
        " this starts `podman system service` itself; to use your own, run e.g."
        " `podman system service --time=0 unix:///run/podman/podman.sock &` and"
        " `export DOCKER_HOST=unix:///run/podman/podman.sock`."
    )


@dataclass
class Stack:
    """The compose project under test."""

    engine: Engine
    scratch: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.scratch / "compose.log"

    def compose(self, *args: str, timeout: float = 900) -> str:
        command = [*self.engine.compose, "-f", str(COMPOSE_FILE), "-p", PROJECT, *args]
        with self.log.open("a") as log:
            log.write(f"$ {' '.join(command)}\n")
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env={**os.environ, **self.env},
            cwd=COMPOSE_FILE.parent,
            timeout=timeout,
            check=False,
        )
        with self.log.open("a") as log:
            log.write(result.stdout + result.stderr)
        if result.returncode != 0:
            raise AssertionError(
                f"{' '.join(command[-len(args) :])} failed ({result.returncode}):\n"
                f"{(result.stdout + result.stderr)[-4000:]}"
            )
        return result.stdout

    def containers(self) -> dict[str, Container]:
        """compose service -> its container (of this project only)."""
        found = self.engine.api.containers.list(
            all=True, filters={"label": f"com.docker.compose.project={PROJECT}"}
        )
        return {c.labels["com.docker.compose.service"]: c for c in found}

    def admin_keys(self) -> Path:
        """The admin keypair and placement's public key, copied from placement's container
        into the scratch folder once (the secret with mode 0600)."""
        folder = self.scratch / "keys"
        if not folder.is_dir():
            folder.mkdir(mode=0o700)
            placement = self.containers()["placement"]
            for name in ADMIN_KEYS:
                stream, _ = placement.get_archive(f"/etc/remem/keys/{name}")
                with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
                    member = tar.extractfile(name)
                    assert member is not None, name
                    target = folder / name
                    target.write_bytes(member.read())
                    target.chmod(0o600)
        return folder

    def status(self) -> dict[str, Any]:
        """`remem status --json` from the host, through placement's published port."""
        keys = self.admin_keys()
        remem = Path(sys.executable).parent / "remem"
        result = subprocess.run(
            [
                str(remem), "status", "--json", "--placement", "tcp://127.0.0.1:7000",
                "--curve-secret-key", str(keys / "admin.key_secret"),
                "--placement-public-key", str(keys / "placement.key"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )  # fmt: skip
        assert result.returncode == 0, f"remem status failed: {result.stderr}"
        status: dict[str, Any] = json.loads(result.stdout)
        return status

    def teardown(self) -> list[str]:
        """compose down with volumes; then remove whatever still carries the project's label.
        Returns what had to be removed by hand (empty when `down` did it all)."""
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            self.compose("down", "-v", "-t", "10", timeout=300)
        api = self.engine.api
        label: dict[str, str | list[str] | bool] = {
            "label": f"com.docker.compose.project={PROJECT}"
        }
        leftovers = []
        for container in api.containers.list(all=True, filters=label):
            leftovers.append(f"container {container.name}")
            container.remove(force=True, v=True)
        for volume in api.volumes.list(filters=label):
            leftovers.append(f"volume {volume.name}")
            volume.remove(force=True)
        for network in api.networks.list(filters=label):
            leftovers.append(f"network {network.name}")
            network.remove()
        return leftovers


# -- checks --------------------------------------------------------------------------------


def ports_in_use() -> list[int]:
    busy = []
    for port in (*HOST_PORTS, NBD_PORT):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                busy.append(port)
    return busy


def healthchecks(stack: Stack) -> dict[str, list[str]]:
    """service -> its healthcheck command, as compose resolved it (not the profile ones)."""
    config = yaml.safe_load(stack.compose("config", timeout=120))
    checks = {}
    for name, service in config["services"].items():
        test = (service.get("healthcheck") or {}).get("test")
        if test and test[0] == "CMD":
            checks[name] = [str(part) for part in test[1:]]
    return checks


def healthy(
    stack: Stack, checks: dict[str, list[str]], passed: set[str], exited: dict[str, float]
) -> bool:
    """Every healthcheck has passed (run through the API: Podman without systemd runs no
    healthcheck timers, and so both engines are asked the same way). Each passing one is
    not run again: every exec costs the engine a runtime call on a busy 2-core machine. A
    service whose container stays exited (its restart policy did not bring it back within
    EXITED_GRACE seconds) fails the run at once, with its log."""
    containers = stack.containers()
    for name, command in checks.items():
        container = containers.get(name)
        if name in passed or container is None:
            continue
        container.reload()
        if container.status == "exited":
            since = exited.setdefault(name, time.monotonic())
            if time.monotonic() - since > EXITED_GRACE:
                tail = container.logs(tail=20).decode(errors="replace")
                raise AssertionError(f"{name} exited and stayed down:\n{tail}")
            continue
        exited.pop(name, None)
        if container.status == "running" and container.exec_run(command).exit_code == 0:
            passed.add(name)
    return passed >= set(checks)


def prometheus_query(query: str) -> list[dict[str, Any]]:
    url = f"{PROMETHEUS}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    with urllib.request.urlopen(url, timeout=5) as response:
        result: list[dict[str, Any]] = json.load(response)["data"]["result"]
    return result


def targets_up() -> int:
    with contextlib.suppress(OSError, KeyError, ValueError):
        return sum(float(r["value"][1]) == 1 for r in prometheus_query('up{job=~"remem-.*"}'))
    return 0


def fio(*extra: str) -> subprocess.Popen[str]:
    tool = shutil.which("fio")
    assert tool, "fio is missing: `make deps` installs it"
    command = [
        tool, "--ioengine=nbd", f"--uri=nbd://127.0.0.1:{NBD_PORT}/remem",
        "--output-format=json", "--verify_state_save=0", *FIO_ARGS, *extra,
    ]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@dataclass
class FioResult:
    verified_bytes: int
    written_bytes: int
    errors: int
    worst_latency_s: float
    seconds: float


def fio_result(proc: subprocess.Popen[str], started: float, timeout: float = 600) -> FioResult:
    out, err = proc.communicate(timeout=timeout)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, f"fio failed ({proc.returncode}), verify error?\n{err}\n{out}"
    report = json.loads(out[out.index("{") :])
    jobs = report["jobs"]
    worst = max(
        int(job[d]["clat_ns"]["max"])
        for job in jobs
        for d in ("read", "write")
        if job[d]["total_ios"]
    )
    return FioResult(
        verified_bytes=sum(int(job["read"]["io_bytes"]) for job in jobs),
        written_bytes=sum(int(job["write"]["io_bytes"]) for job in jobs),
        errors=sum(int(job["error"]) for job in jobs),
        worst_latency_s=worst / 1e9,
        seconds=seconds,
    )


def fully_replicated(stack: Stack, slabs: int) -> dict[str, Any] | None:
    status = stack.status()
    live = {s["server_id"] for s in status["servers"] if s["state"] == "live"}
    held = sum(s["slabs"] for s in status["servers"] if s["server_id"] in live)
    ok = status["slabs_total"] == slabs and not status["degraded"] and held == 2 * slabs
    return status if ok and not status["pushes"] else None


# -- the run -------------------------------------------------------------------------------


def image_sizes(stack: Stack) -> dict[str, int]:
    sizes = {}
    for name, container in stack.containers().items():
        if name != "keys":
            sizes[name] = int(stack.engine.api.images.get(container.attrs["Image"]).attrs["Size"])
    return sizes


def placement_counts() -> dict[str, float]:
    """placement_pageservers and placement_slabs by state, from placement's metrics port
    (cheap to poll: no process started, unlike `remem status`)."""
    found = {}
    with contextlib.suppress(OSError):
        for name, value in metrics(PLACEMENT_METRICS).items():
            if name.startswith(("placement_pageservers{", "placement_slabs{")):
                found[name.replace('{state="', ".").rstrip('"}')] = value
    return found


def bring_up(stack: Stack, figures: dict[str, Any]) -> None:
    """Build, `up`, and wait until every service is ready; times both."""
    started = time.monotonic()
    stack.compose("build", timeout=1800)
    figures["build_s"] = round(time.monotonic() - started, 1)
    say(f"images built in {figures['build_s']} s")

    checks = healthchecks(stack)
    started = time.monotonic()
    stack.compose("up", "-d", timeout=600)
    figures["up_command_s"] = round(time.monotonic() - started, 1)
    passed: set[str] = set()
    exited: dict[str, float] = {}
    wait_until("every healthcheck to pass", lambda: healthy(stack, checks, passed, exited), 180, 1)
    wait_until(
        "three live page servers",
        lambda: placement_counts().get("placement_pageservers.live") == len(PAGESERVERS),
        120,
    )
    wait_until("Prometheus to scrape every target", lambda: targets_up() == SCRAPE_TARGETS, 60)
    figures["ready_s"] = round(time.monotonic() - started, 1)
    figures["image_bytes"] = image_sizes(stack)
    say(f"ready {figures['ready_s']} s after `up` (up itself {figures['up_command_s']} s)")


def kill_during_fio(stack: Stack, figures: dict[str, Any]) -> str:
    """fio writing and verifying; the page server holding most slabs SIGKILLed during its
    writes. Returns the victim."""
    fio_started = time.monotonic()
    run = fio("--do_verify=1")
    wait_until(
        "fio to place all four slabs",
        lambda: (
            sum(v for k, v in placement_counts().items() if k.startswith("placement_slabs."))
            == FIO_JOBS
        ),
        60,
    )
    assert run.poll() is None, "fio finished before the kill: nothing was tested"
    holder = max(stack.status()["servers"], key=lambda server: server["slabs"])
    victim = str(holder["server_id"])
    container = stack.containers()[victim]
    started_before = container.attrs["State"]["StartedAt"]
    killed_at = time.monotonic()
    container.kill(signal="SIGKILL")
    kill: dict[str, Any] = {
        "server": victim,
        "slabs_held": holder["slabs"],
        "into_fio_s": round(killed_at - fio_started, 1),
    }
    figures["kill"] = kill
    say(f"SIGKILLed {victim} ({holder['slabs']} slabs), {kill['into_fio_s']} s into fio")

    def outcome() -> str | None:
        """dead: placement saw it die; restarted: the engine restarted it first."""
        if placement_counts().get("placement_pageservers.dead", 0) >= 1:
            return "dead"
        container.reload()
        restarted = container.attrs["State"]["StartedAt"] != started_before
        return "restarted" if container.status == "running" and restarted else None

    kill["outcome"] = wait_until(f"{victim} dead or restarted", outcome, 60, 0.1)
    kill["detected_after_s"] = round(time.monotonic() - killed_at, 2)
    first = fio_result(run, fio_started)
    assert first.errors == 0 and first.verified_bytes == FIO_JOBS * FIO_JOB_BYTES, first
    figures["fio"] = first.__dict__
    say(
        f"fio: {first.written_bytes >> 20} MiB written at "
        f"{first.written_bytes / first.seconds / 2**20:.1f} MiB/s, "
        f"{first.verified_bytes >> 20} MiB verified, 0 errors, "
        f"worst I/O {first.worst_latency_s:.2f} s"
    )

    repaired = wait_until(
        "every slab back at two live replicas", lambda: fully_replicated(stack, FIO_JOBS), 180, 1
    )
    container.reload()
    kill.update(
        repaired_after_s=round(time.monotonic() - killed_at, 1),
        rereplicated_bytes=repaired["rereplicated_bytes"],
        pushes_done=repaired["pushes_done"],
        container_after_repair=container.status,
    )
    with contextlib.suppress(OSError, KeyError, ValueError):
        down = prometheus_query(f'up{{job="remem-pageserver",instance="{victim}"}}')
        kill["prometheus_up_after_repair"] = [float(r["value"][1]) for r in down]
    say(
        f"{kill['outcome']} after {kill['detected_after_s']} s; every slab at two live "
        f"replicas {kill['repaired_after_s']} s after the kill "
        f"({repaired['rereplicated_bytes'] >> 20} MiB re-replicated)"
    )
    return victim


def check_after_repair(stack: Stack, victim: str, figures: dict[str, Any]) -> None:
    """Everything verifies again (the re-replicated copies); the killed page server, started
    again, is live again; the client answered no NBD request with an error."""
    started = time.monotonic()
    second = fio_result(fio("--verify_only=1"), started)
    assert second.errors == 0 and second.verified_bytes == FIO_JOBS * FIO_JOB_BYTES, second
    figures["fio_verify_after_repair"] = second.__dict__
    say(f"verified again after the repair: {second.verified_bytes >> 20} MiB, 0 errors")

    container = stack.containers()[victim]
    container.reload()
    if container.status != "running":
        container.start()
    started = time.monotonic()
    wait_until(
        f"{victim} live again",
        lambda: placement_counts().get("placement_pageservers.live") == len(PAGESERVERS),
        120,
    )
    figures["kill"]["back_live_after_start_s"] = round(time.monotonic() - started, 1)
    say(f"{victim} started again: live after {figures['kill']['back_live_after_start_s']} s")

    client = metrics(CLIENT_METRICS)
    figures["client"] = {
        name: value
        for name, value in client.items()
        if name.startswith(("client_replica_", "client_read_repairs_total")) and value
    }
    nbd_errors = sum(
        value
        for name, value in client.items()
        if name.startswith("client_nbd_requests_total") and 'result="error"' in name
    )
    assert nbd_errors == 0, f"the client answered {nbd_errors} NBD requests with an error"


def drive(stack: Stack, figures: dict[str, Any]) -> None:
    bring_up(stack, figures)
    victim = kill_during_fio(stack, figures)
    check_after_repair(stack, victim, figures)


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def dump_logs(stack: Stack) -> None:
    for name, container in sorted(stack.containers().items()):
        with contextlib.suppress(docker.errors.DockerException):
            tail = container.logs(tail=40).decode(errors="replace")
            print(f"----- {name} ({container.status})\n{tail}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.system.compose_stack", description=__doc__
    )
    parser.parse_args(argv)
    # SIGTERM (make or CI stopping the run) unwinds like Ctrl-C, so the teardown still runs.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    busy = ports_in_use()
    if busy:
        raise SystemExit(f"compose-test: ports in use on 127.0.0.1: {busy} (another stack?)")
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="remem-compose-test-") as scratch:
        engine = find_engine(Path(scratch))
        figures["engine"] = engine.name
        # BUILDAH_FORMAT: Podman builds OCI images by default, which drop HEALTHCHECK.
        stack = Stack(
            engine,
            Path(scratch),
            env={"BUILDAH_FORMAT": "docker", "REMEM_NBD_PORT": str(NBD_PORT)},
        )
        ok = False
        try:
            drive(stack, figures)
            ok = True
        finally:
            if not ok:
                dump_logs(stack)
                print(stack.log.read_text()[-6000:] if stack.log.exists() else "", file=sys.stderr)
            leftovers = stack.teardown()
            engine.close()
            figures["teardown_removed_by_hand"] = leftovers
        say(
            "torn down: containers, volumes, networks"
            + (f" (by hand: {leftovers})" if leftovers else "")
        )
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
