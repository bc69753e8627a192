"""A restart of the remem client under swap loses nothing (a guest kernel's real nbd driver).

The client host is split across two kernels: the remem cluster (placement, three page
servers, Curve everywhere) runs here, with the mirror and the client started from their
systemd units in deploy/systemd (their ExecStart= and an EnvironmentFile= made from the
shipped examples, by `units.ServiceUnit`: systemd is not PID 1 on these machines); the
kernel that swaps is Debian's, in a qemu guest (guest.py), whose init runs the swap unit's
ExecStart= (remem-swap attach: nbd-client -persist -nonetlink over TCP to 10.0.2.2, mkswap,
swapon) and, at the end, its ExecStop= (swapoff, nbd-client -d).

In the guest a hog writes more than the guest's RAM, so most of it goes out to remem, and
prints "HOG written". The host then restarts the client as `systemctl restart remem-client`
does (SIGTERM, wait for the exit, ExecStart= again, wait for READY=1) and types a line on the
guest's console; the hog reads every byte back, and when it is 30% through the host restarts
the client once more, this time while page-ins are in flight. Any wrong word, a guest kernel
panic, oops or hung task, a swap I/O error, or a step overrunning its bound fails the test.

nbd-client attaches straight to the client (here over TCP, for the guest). Linux 6.1 fails
every request issued while an NBD connection is down ("Dead connection, failed to find a
fallback"), so the connection must never go down: on SIGTERM the client answers what it has
read and hands the socket to the unit's file-descriptor store (FileDescriptorStoreMax=,
played by units.py as systemd 252 does), and the next process resumes it without a
handshake. The test checks that each restart passed the connection on (LISTEN_FDNAMES).

`make test-vm` runs it (after `make deps-vm`: qemu, nbd-client, busybox-static).
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from remem_common.placement_requests import (
    BlockingPlacementClient,
    PlacementRequestError,
    PlacementRequestTimeout,
)
from remem_common.security import Security, load_public_key
from remem_common.testing import ServiceProcess, scrape_metrics, start_service

from . import guest
from .units import ServiceUnit, UnitFile, read_environment_file, write_environment_file

pytestmark = [
    pytest.mark.slow,
    pytest.mark.root,
    pytest.mark.vm,
    pytest.mark.timeout(1800),
]

UNITS = guest.REPO / "deploy/systemd"
REMEM = str(Path(sys.executable).with_name("remem"))
GUEST_MEMORY_MIB = 128
HOG_MIB = 320  # 2.5x the guest's RAM (of which the kernel leaves ~80 MiB to user space)
# The hog fills 60% of it: past half full, Linux frees a page's swap slot when it comes back
# in (vm_swap_full), so the verification writes about as much as it reads, which is more
# traffic through the restarts. (With 1 GiB the direct attach stalled in the guest's atomic
# allocations before the first restart, once; 512 MiB has not.)
DEVICE_SIZE = "512MiB"
TENANT = "vmtest"
PAGESERVERS = 3
# Bounds of each step under TCG on 2 shared cores (measured: boot + attach ~10 s, writing
# 320 MiB ~30 s, a restart ~1 s, verifying 1-3 min, detach ~2 s).
BOOT_S = 180
WRITE_S = 600
VERIFY_S = 900
FINISH_S = 240
# Placement tuned for small arenas and quick registration (as tests/faults does).
PLACEMENT_POLICY = [
    "--heartbeat-interval", "0.25", "--min-free", "16MiB", "--alloc-reserve", "16MiB",
    "--scrape-interval", "0.5", "--restart-grace", "1",
]  # fmt: skip
# A lost connection while the client restarts is expected ("Receive control failed"); an
# I/O error the kernel passes on to swap is not.
SWAP_IO_ERROR = re.compile(r"I/O error|(Read|Write)-error on swap-device")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def make_keys(folder: Path) -> None:
    """Keypairs as an operator makes them with `remem keys` (README, Security)."""
    pairs = [("placement", "placement"), ("mirror", "mirror"), ("admin", "admin")]
    pairs += [(f"pageserver-{i}", "pageserver") for i in range(PAGESERVERS)]
    for name, role in pairs:
        subprocess.run([REMEM, "keys", "--dir", str(folder), name, "--role", role], check=True)
    subprocess.run(
        [REMEM, "keys", "--dir", str(folder), "client", "--role", "client", "--tenant", TENANT],
        check=True,
    )


def wait_registered(endpoint: str, keys: Path, timeout: float = 60) -> None:
    """Until placement lists every page server live and sampled, out of its restart grace."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    security = Security.curve(keys / "admin.key_secret")
    deadline = time.monotonic() + timeout
    try:
        with BlockingPlacementClient(
            endpoint,
            context=context,
            timeout=1.0,
            security=security,
            server_key=load_public_key(keys / "placement.key"),
        ) as placement:
            while time.monotonic() < deadline:
                try:
                    status = placement.status()
                except (PlacementRequestError, PlacementRequestTimeout):
                    continue
                live = [
                    s
                    for s in status.servers
                    if s.state == "live" and s.utilization_from == "metrics"
                ]
                if len(live) >= PAGESERVERS and not status.in_grace:
                    return
                time.sleep(0.1)  # polling placement's state
    finally:
        security.close()
        context.destroy(linger=0)
    raise AssertionError(f"page servers not registered with placement after {timeout}s")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """Placement and page servers on loopback TCP with Curve; yields (endpoint, keys)."""
    keys = tmp_path / "keys"
    make_keys(keys)
    shm = Path("/dev/shm") / f"remem-vm-{uuid.uuid4().hex[:12]}"
    shm.mkdir()
    started: list[ServiceProcess] = []
    curve = ["--no-insecure", "--curve-authorized", str(keys)]
    try:
        placement = start_service(
            "placement",
            ["placement", "--listen", "tcp://127.0.0.1:0", "--metrics-port", "0",
             "--curve-secret-key", str(keys / "placement.key_secret"), *curve,
             *PLACEMENT_POLICY],
        )  # fmt: skip
        started.append(placement)
        endpoint = placement.ready["endpoint"]
        for index in range(PAGESERVERS):
            name = f"pageserver-{index}"
            args = [
                "pageserver", "--capacity", DEVICE_SIZE, "--listen", "tcp://127.0.0.1:0",
                "--metrics-port", "0", "--zone", f"zone-{index}", "--server-id", name,
                "--placement", endpoint, "--shm-path", str(shm / f"{name}.arena"),
                "--curve-secret-key", str(keys / f"{name}.key_secret"), *curve,
                "--placement-public-key", str(keys / "placement.key"),
            ]  # fmt: skip
            started.append(start_service(name, args))
        wait_registered(endpoint, keys)
        yield endpoint, keys
    finally:
        for service in reversed(started):
            service.stop(timeout=30)
        shutil.rmtree(shm, ignore_errors=True)


def service_unit(name: str, env: dict[str, str], tmp_path: Path) -> ServiceUnit:
    """The unit `name` of deploy/systemd, its EnvironmentFile= the shipped example with
    `env` laid over it."""
    unit = UnitFile.load(UNITS / f"{name}.service")
    (env_file_name,) = unit.values("Service", "EnvironmentFile")
    example = read_environment_file(UNITS / Path(env_file_name).name)
    env_file = tmp_path / Path(env_file_name).name
    write_environment_file(env_file, {**example, **env})
    return ServiceUnit(
        unit=unit,
        executables={"/usr/local/bin/remem": REMEM},
        files={env_file_name: env_file},
        runtime=tmp_path,
        log_path=tmp_path / f"{name}.log",
    )


def nbd_requests(metrics: dict[str, float], cmd: str, result: str = "ok") -> int:
    return int(metrics.get(f'client_nbd_requests_total{{cmd="{cmd}",result="{result}"}}', 0))


def test_client_restart_under_swap_loses_nothing(tmp_path: Path, cluster: tuple[str, Path]) -> None:
    missing = guest.missing_tools()
    assert not missing, f"missing {', '.join(missing)}: run `make deps-vm`"
    placement, keys = cluster
    mirror_admits = tmp_path / "mirror-admits"
    mirror_admits.mkdir()
    shutil.copy(keys / "client.key", mirror_admits)
    mirror_socket = f"ipc://{tmp_path / 'mirror.sock'}"
    mirror = service_unit(
        "remem-mirror",
        {
            "REMEM_MIRROR_PATH": str(tmp_path / "mirror.img"),
            "REMEM_MIRROR_SIZE": DEVICE_SIZE,
            "REMEM_MIRROR_LISTEN": mirror_socket,
            "REMEM_MIRROR_CURVE_SECRET_KEY": str(keys / "mirror.key_secret"),
            "REMEM_MIRROR_CURVE_AUTHORIZED": str(mirror_admits),
            "REMEM_MIRROR_METRICS_PORT": "0",
        },
        tmp_path,
    )
    nbd_port = free_port()
    client_socket = tmp_path / "nbd.sock"
    client_env = {
        "REMEM_CLIENT_NBD_SOCKET": str(client_socket),
        "REMEM_CLIENT_SIZE": DEVICE_SIZE,
        "REMEM_CLIENT_PLACEMENT": placement,
        "REMEM_CLIENT_TENANT": TENANT,
        "REMEM_CLIENT_CURVE_SECRET_KEY": str(keys / "client.key_secret"),
        "REMEM_CLIENT_PLACEMENT_PUBLIC_KEY": str(keys / "placement.key"),
        "REMEM_CLIENT_MIRROR": mirror_socket,
        "REMEM_CLIENT_MIRROR_PUBLIC_KEY": str(keys / "mirror.key"),
        "REMEM_CLIENT_PAGE_KEY": str(tmp_path / "page.key"),
        "REMEM_CLIENT_METRICS_PORT": "0",
    }
    # The guest reaches the host's loopback as 10.0.2.2 (qemu's user network): the client
    # listens on TCP here too.
    swap_env = {"REMEM_SWAP_SERVER": f"10.0.2.2:{nbd_port}"}
    client_env["REMEM_CLIENT_NBD_LISTEN"] = f"127.0.0.1:{nbd_port}"
    client = service_unit("remem-client", client_env, tmp_path)
    units: list[ServiceUnit] = [mirror, client]
    swap_unit = UnitFile.load(UNITS / "remem-swap@.service", instance="nbd0")
    swap_env = {**read_environment_file(UNITS / "swap.env"), **swap_env}
    (start_swap,) = swap_unit.commands("ExecStart", swap_env)
    (stop_swap,) = swap_unit.commands("ExecStop", swap_env)

    kernel = guest.fetch_kernel()
    initramfs = guest.build_initramfs(kernel, tmp_path / "initramfs.gz", tmp_path)
    guest_env = "".join(
        f"{key}={value}\n" for key, value in swap_env.items() if key.startswith("REMEM_SWAP_")
    )
    vm = guest.Guest(
        kernel,
        initramfs,
        [
            f"remem.hog={HOG_MIB}",
            f"remem.env64={b64(guest_env)}",
            f"remem.start64={b64(chr(10).join(start_swap))}",
            f"remem.stop64={b64(chr(10).join(stop_swap))}",
        ],
        tmp_path / "console.log",
        memory_mib=GUEST_MEMORY_MIB,
    )
    figures: dict[str, float] = {}
    stopped: dict[str, int] = {}
    try:
        for unit in units:  # in the order systemd starts them (After=)
            unit.start()
        started = time.monotonic()
        vm.start()
        vm.wait_for(r"REMEMVM swap-on 1 device", BOOT_S)
        figures["boot_attach_s"] = time.monotonic() - started
        written = vm.wait_for(r"HOG written .*pswpin=(\d+) pswpout=(\d+)", WRITE_S)
        figures["written_s"] = time.monotonic() - started
        figures["pswpout_before_restart"] = int(written.group(2))
        first = scrape_metrics(metrics_url(client))

        # Restart 1: the hog waits with most of its pages out on remem.
        figures["restart1_s"] = restart(client)
        vm.type_line("go")
        # Restart 2: 30% into the verification, while pages come in.
        vm.wait_for(r"HOG verify-progress 30%", VERIFY_S)
        second = scrape_metrics(metrics_url(client))
        figures["restart2_s"] = restart(client)
        verified = vm.wait_for(
            r"HOG verified .*bad_words=(\d+) .*pswpin_after_go=(\d+) pswpout_after_go=(\d+)",
            VERIFY_S,
        )
        figures["verified_s"] = time.monotonic() - started
        figures["bad_words"] = int(verified.group(1))
        figures["pswpin_after_restart"] = int(verified.group(2))
        figures["pswpout_after_restart"] = int(verified.group(3))
        third = scrape_metrics(metrics_url(client))
        result = vm.wait_for(r"REMEMVM-RESULT: (\w+)(.*)", FINISH_S)
        assert vm.wait_exit(60) == 0
        figures["total_s"] = time.monotonic() - started
        # What `systemctl stop remem.target` does once the swap device is detached.
        for unit in reversed(units):
            stopped[unit.unit.name] = unit.stop()
    finally:
        vm.kill()
        for unit in units:
            unit.kill()
        print(f"console: {vm.log_path}\n{vm.tail(30)}")
        for unit in units:
            if unit.not_applied:
                print(f"{unit.unit.name}: not applied: {', '.join(sorted(unit.not_applied))}")

    served = [(nbd_requests(m, "read"), nbd_requests(m, "write")) for m in (first, second, third)]
    print(
        "client restart under swap: "
        + " ".join(f"{name}={value:.1f}" for name, value in figures.items())
        + " client processes (reads, writes): "
        + " ".join(f"#{n}={r},{w}" for n, (r, w) in enumerate(served, 1))
    )
    assert figures["bad_words"] == 0
    assert result.group(1) == "PASS", result.group(0)
    # Most of the hog was out on remem when the client restarted, and came back through the
    # new processes.
    hog_pages = HOG_MIB * 256
    assert figures["pswpout_before_restart"] > hog_pages // 2
    assert figures["pswpin_after_restart"] > hog_pages // 2
    assert served[1][0] > 0 and served[2][0] > 0
    for metrics in (first, second, third):
        assert not any(nbd_requests(metrics, c, "error") for c in ("read", "write", "flush"))
    errors = [line for line in vm.lines if SWAP_IO_ERROR.search(line)]
    assert not errors, "swap I/O errors in the guest:\n" + "\n".join(errors[:20])
    assert set(stopped.values()) == {0}, stopped
    # Each restart passed the kernel's connection on through the store, and the next
    # process took it out again.
    assert client.passed == [[], ["nbd-0"], ["nbd-0"]], client.passed


def metrics_url(client: ServiceUnit) -> str:
    """The client's /metrics, from the STATUS= it sent with READY=1."""
    match = re.search(r"metrics=(\S+)", client.status)
    assert match, f"no metrics URL in the client's STATUS= {client.status!r}"
    return match.group(1)


def restart(client: ServiceUnit) -> float:
    """`systemctl restart remem-client`; returns its seconds (the old process must exit 0)."""
    began = time.monotonic()
    status = client.restart()
    assert status == 0, f"the client's exit status after SIGTERM was {status}"
    return time.monotonic() - began
