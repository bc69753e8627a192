"""The client host's systemd units (deploy/systemd) as systemd itself reads them.

`systemd-analyze verify` (Debian's systemd) checks every unit in a temporary root that holds
the units, the stock units of this machine's systemd (so their dependencies resolve) and the
executables the units run, at the paths they name: any message about our units fails. The
example environment files must set only variables the services know, and with values they
accept (`--print-config` reads them as the unit would). The client's READY=1 to
$NOTIFY_SOCKET, which Type=notify and the swap device's ordering rely on, is checked against
a real `remem client`. The boot-to-swap behaviour of the units (restart under swap) is
tests/system/vm.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from remem_client.config import ClientConfig
from remem_mirror.config import MirrorConfig

UNITS = Path(__file__).resolve().parents[2] / "deploy/systemd"
UNIT_FILES = sorted(
    p.name for p in UNITS.iterdir() if p.suffix in (".service", ".target", ".socket")
)
# The instance systemd-analyze checks the template with.
VERIFIED = [name.replace("@.", "@nbd0.") for name in UNIT_FILES]
REMEM = Path(sys.executable).with_name("remem")
STOCK_UNITS = Path("/usr/lib/systemd/system")


def executables(root: Path) -> dict[str, Path]:
    """Unit path -> what provides it here (the script from this repo, the rest installed)."""
    return {
        "/usr/local/bin/remem": REMEM,
        "/usr/local/lib/remem/remem-swap": UNITS / "remem-swap",
    }


def make_root(root: Path) -> None:
    """A root file system as `systemd-analyze verify --root` needs it."""
    assert STOCK_UNITS.is_dir(), "systemd is not installed (make deps)"
    shutil.copytree(STOCK_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    (root / "lib").symlink_to("usr/lib")  # the stock units' links point into /lib
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for name in UNIT_FILES:
        shutil.copy(UNITS / name, units / name)
    for unit_path, here in executables(root).items():
        target = root / unit_path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        # A copy, not a link: verify resolves links inside the root.
        shutil.copy(here, target)
    for env in ("client.env", "mirror.env", "swap.env"):
        target = root / "etc/remem" / env
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(UNITS / env, target)


def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is not installed (make deps: systemd)"
    make_root(tmp_path)
    result = subprocess.run(
        [analyze, "verify", "--man=no", f"--root={tmp_path}", *VERIFIED],
        cwd=tmp_path / "etc/systemd/system",
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, output
    assert {"remem-client.service", "remem-mirror.service", "remem.target"} <= set(UNIT_FILES)


def test_verify_reports_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: an unknown key and a missing executable are reported."""
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is not installed (make deps: systemd)"
    make_root(tmp_path)
    unit = tmp_path / "etc/systemd/system/remem-client.service"
    unit.write_text(unit.read_text().replace("OOMScoreAdjust=", "OOMScoreAdjustt="))
    (tmp_path / "usr/local/lib/remem/remem-swap").unlink()
    result = subprocess.run(
        [analyze, "verify", "--man=no", f"--root={tmp_path}", *VERIFIED],
        cwd=tmp_path / "etc/systemd/system",
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert "Unknown key 'OOMScoreAdjustt'" in output
    assert "remem-swap is not executable" in output


def read_env(name: str) -> dict[str, str]:
    env = {}
    for line in (UNITS / name).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


@pytest.mark.parametrize(
    ("env_file", "prefix", "model"),
    [("client.env", "REMEM_CLIENT_", ClientConfig), ("mirror.env", "REMEM_MIRROR_", MirrorConfig)],
)
def test_example_env_sets_only_known_settings(
    env_file: str, prefix: str, model: type[ClientConfig] | type[MirrorConfig]
) -> None:
    env = read_env(env_file)
    unknown = [
        key
        for key in env
        if not key.startswith(prefix) or key.removeprefix(prefix).lower() not in model.model_fields
    ]
    assert not unknown, f"{env_file} sets variables no flag reads: {unknown}"


@pytest.mark.parametrize(
    ("env_file", "service"), [("client.env", "client"), ("mirror.env", "mirror")]
)
def test_example_env_is_a_valid_config(env_file: str, service: str, tmp_path: Path) -> None:
    """The service accepts the example's values (paths made to exist where it checks)."""
    env = {"PATH": "/usr/bin:/bin", **read_env(env_file)}
    result = subprocess.run(
        [str(REMEM), service, "--print-config"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert '"insecure": false' in result.stdout  # the examples run Curve


def test_swap_env_names_what_the_units_read() -> None:
    env = read_env("swap.env")
    used = (UNITS / "remem-swap").read_text()
    assert all(key in used for key in env), env
    # The swap device attaches straight to the client (which keeps it across restarts).
    assert env["REMEM_SWAP_SERVER"] == read_env("client.env")["REMEM_CLIENT_NBD_SOCKET"]


def test_client_unit_keeps_its_connections_across_a_restart() -> None:
    """The handover needs the store, the flag, and a runtime directory kept over a restart."""
    unit = (UNITS / "remem-client.service").read_text().splitlines()
    assert "FileDescriptorStoreMax=16" in unit
    assert "Environment=REMEM_CLIENT_HANDOVER=true" in unit
    assert "RuntimeDirectoryPreserve=restart" in unit
    assert "Type=notify" in unit


def test_swap_script_is_posix_sh_and_refuses_bad_arguments() -> None:
    script = str(UNITS / "remem-swap")
    subprocess.run(["sh", "-n", script], check=True)
    for args in ([], ["attach"], ["attach", "/dev/sda"], ["frobnicate", "/dev/nbd0"]):
        result = subprocess.run([script, *args], capture_output=True, text=True, timeout=10)
        assert result.returncode != 0, args
        assert "remem-swap:" in result.stderr


def test_client_notifies_ready_and_stopping(tmp_path: Path) -> None:
    """Type=notify: READY=1 (with STATUS=) once it serves NBD, STOPPING=1 on SIGTERM."""
    notify_path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(60)
        client = subprocess.Popen(
            [str(REMEM), "client", "--backend", "memory", "--size", "16MiB",
             "--nbd-socket", str(tmp_path / "nbd.sock"), "--metrics-port", "0",
             "--no-lock-memory"],
            env={"PATH": "/usr/bin:/bin", "NOTIFY_SOCKET": str(notify_path)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            ready = notify.recv(4096).decode().splitlines()
            assert ready[0] == "READY=1"
            assert ready[1].startswith("STATUS=serving nbd_uri=nbd+unix:///remem?socket=")
            assert (tmp_path / "nbd.sock").is_socket()
            client.send_signal(signal.SIGTERM)
            assert notify.recv(4096) == b"STOPPING=1"
            _, errors = client.communicate(timeout=30)
            assert client.returncode == 0, errors
        finally:
            if client.poll() is None:
                client.kill()
                client.communicate(timeout=10)
