"""`remem client --backend memory` as a real process, driven by real NBD clients: nbdinfo,
nbdcopy, qemu-io, fio (nbd engine, with verification) and nbdsh (libnbd), plus lifecycle
(ready line, metrics, SIGTERM, bad config, TCP).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from remem_client.nbd import wire
from remem_common.testing import ServiceProcess, scrape_metrics, start_service

from .nbd_raw import RawNbd

SIZE = 1 << 30
MiB = 1 << 20
# The Debian package that provides each command the tests drive.
PACKAGES = {
    "nbdinfo": "libnbd-bin",
    "nbdcopy": "libnbd-bin",
    "nbdsh": "python3-libnbd",
    "qemu-io": "qemu-utils",
    "fio": "fio",
}


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} not installed (Debian package {PACKAGES[tool]}; see `make deps`)")
    return path


def run(args: list[str], timeout: float = 90, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, (
        f"{args[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


def client_args(socket_path: Path, size: str = "1GiB", *extra: str) -> list[str]:
    return [
        "client", "--backend", "memory", "--nbd-socket", str(socket_path),
        "--size", size, "--metrics-port", "0", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """One server shared by the tests of this module; each test uses its own region."""
    path = tmp_path_factory.mktemp("nbd") / "nbd.sock"
    started = start_service("client", client_args(path))
    yield started
    assert started.stop() == 0, started.log()


@pytest.fixture
def uri(service: ServiceProcess) -> str:
    return service.ready["nbd_uri"]


def socket_of(service: ServiceProcess) -> str:
    return service.ready["nbd_uri"].split("socket=", 1)[1]


def test_ready_line_names_the_uri_and_metrics(service: ServiceProcess) -> None:
    assert set(service.ready) == {"nbd_uri", "metrics"}
    assert service.ready["nbd_uri"].startswith("nbd+unix:///remem?socket=/")
    assert service.ready["metrics"].startswith("http://127.0.0.1:")


def test_nbdinfo_shows_size_block_sizes_and_flags(uri: str) -> None:
    info = json.loads(run([need("nbdinfo"), "--json", uri]))
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True
    (export,) = info["exports"]
    assert export["export-name"] == "remem"
    assert export["export-size"] == SIZE
    assert (
        export["block_size_minimum"],
        export["block_size_preferred"],
        export["block_size_maximum"],
    ) == (1, 4096, 32 * MiB)
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_multi_conn"):
        assert export[flag] is True, flag
    assert export["can_df"] is True
    assert export["is_read_only"] is False
    assert export["can_cache"] is False


def test_nbdinfo_lists_the_export(uri: str) -> None:
    listing = json.loads(run([need("nbdinfo"), "--json", "--list", uri.replace("/remem?", "/?")]))
    assert [e["export-name"] for e in listing["exports"]] == ["remem"]


def test_nbdcopy_256mib_in_and_out_is_identical(tmp_path: Path) -> None:
    need("nbdcopy")
    source = tmp_path / "source.img"
    with source.open("wb") as f:
        for _ in range(64):
            f.write(os.urandom(4 * MiB))
    # a device exactly as large as the image, so the copy back is the whole device
    server = start_service("client256", client_args(tmp_path / "s.sock", "256MiB"))
    try:
        target = server.ready["nbd_uri"]
        run(["nbdcopy", "--flush", str(source), target], timeout=120)
        back = tmp_path / "back.img"
        run(["nbdcopy", target, str(back)], timeout=120)
        digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (source, back)]
        assert digest[0] == digest[1]
    finally:
        assert server.stop() == 0, server.log()


def qemu_io(uri: str, *commands: str) -> str:
    args = [need("qemu-io"), "-f", "raw", uri]
    for command in commands:
        args += ["-c", command]
    out = run(args)
    assert "fail" not in out.lower(), out
    return out


def test_qemu_io_patterns_at_unaligned_offsets_and_the_end(
    uri: str, service: ServiceProcess
) -> None:
    base = 300 * MiB
    qemu_io(
        uri,
        f"write -P 0x11 {base} 65536",
        f"write -P 0xab {base + 1000} 5000",
        f"write -P 0xcd {base + 7} 1",
        f"write -P 0x5a {base + 40961} 12345",
    )
    qemu_io(
        uri,
        f"read -P 0x11 {base} 7",
        f"read -P 0xcd {base + 7} 1",
        f"read -P 0x11 {base + 8} 992",
        f"read -P 0xab {base + 1000} 5000",
        f"read -P 0x11 {base + 6000} 34961",
        f"read -P 0x5a {base + 40961} 12345",
        f"read -P 0x11 {base + 53306} {65536 - 53306}",
    )
    # the very last bytes of the device
    qemu_io(uri, f"write -P 0xee {SIZE - 777} 777")
    qemu_io(uri, f"read -P 0xee {SIZE - 777} 777")
    # and what qemu wrote is byte for byte what a raw client reads
    with RawNbd.unix(socket_of(service)).connect() as raw:
        assert raw.read(base + 995, 10) == b"\x11" * 5 + b"\xab" * 5
        assert raw.read(SIZE - 778, 778) == b"\0" + b"\xee" * 777


def fio(uri: str, *args: str) -> None:
    # no verify state files left in the working directory
    out = run(
        [need("fio"), "--ioengine=nbd", f"--uri={uri}", "--output-format=json",
         "--verify_state_save=0", *args]
    )  # fmt: skip
    report = json.loads(out[out.index("{") :])
    for job in report["jobs"]:
        assert job["error"] == 0, job
    assert sum(job["write"]["io_bytes"] for job in report["jobs"]) > 0


def test_fio_random_write_then_verify_at_qd32(uri: str) -> None:
    fio(
        uri,
        "--name=verify32", "--rw=randwrite", "--bs=4k", "--iodepth=32",
        "--offset=400M", "--size=32M", "--verify=crc32c", "--do_verify=1",
        "--verify_fatal=1",
    )  # fmt: skip


def test_fio_several_connections_at_once_verify(uri: str) -> None:
    # four jobs = four NBD connections writing (and verifying) their own regions at once;
    # mixed sizes up to 256 KiB exercise payloads received into their own buffers
    fio(
        uri,
        "--name=multi", "--numjobs=4", "--rw=randwrite", "--bssplit=4k/50:64k/30:256k/20",
        "--iodepth=16", "--offset=500M", "--size=16M", "--offset_increment=16M",
        "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--group_reporting=0",
    )  # fmt: skip


NBDSH_SCRIPT = textwrap.dedent(
    """
    import errno, json, os
    uri = os.environ["URI"]
    out = {}

    def err(fn):
        try:
            fn()
        except nbd.Error as exc:
            return errno.errorcode.get(exc.errnum, exc.errnum)
        return "ok"

    h.set_opt_mode(True)
    h.connect_uri(uri)
    names = []
    h.opt_list(lambda name, description: names.append(name))
    out["list"] = names
    # a known-but-unsupported option is refused and negotiation goes on
    out["meta_context"] = err(lambda: h.opt_list_meta_context(lambda name: 0))
    h.set_export_name("nope")
    out["info_unknown"] = err(h.opt_info)
    h.set_export_name("remem")
    h.opt_info()
    out["info_size"] = h.get_size()
    h.opt_go()
    out["structured"] = h.get_structured_replies_negotiated()
    out["block_sizes"] = [h.get_block_size(s) for s in
                          (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM)]
    size = h.get_size()
    h.set_strict_mode(0)  # send what libnbd would refuse itself, so the server answers
    out["read_past_end"] = err(lambda: h.pread(4096, size - 100))
    out["write_past_end"] = err(lambda: h.pwrite(b"x" * 4096, size - 100))
    out["trim_past_end"] = err(lambda: h.trim(4096, size - 100))
    out["zero_past_end"] = err(lambda: h.zero(4096, size - 100))
    out["read_offset_past_end"] = err(lambda: h.pread(1, size + 10))
    out["read_too_big"] = err(lambda: h.pread(33 * 1024 * 1024, 0))
    out["write_no_hole_flag"] = err(lambda: h.pwrite(b"x", 0, nbd.CMD_FLAG_NO_HOLE))
    out["read_fast_zero_flag"] = err(lambda: h.pread(1, 0, nbd.CMD_FLAG_FAST_ZERO))
    out["trim_req_one_flag"] = err(lambda: h.trim(1, 0, nbd.CMD_FLAG_REQ_ONE))
    out["read_fua"] = err(lambda: h.pread(1, 0, nbd.CMD_FLAG_FUA))
    out["read_df"] = err(lambda: h.pread(1, 0, nbd.CMD_FLAG_DF))
    out["cache"] = err(lambda: h.cache(4096, 0))
    base = 700 * 1024 * 1024
    h.pwrite(b"\\xaa" * 10000, base, nbd.CMD_FLAG_FUA)
    h.zero(4000, base + 3000, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    data = h.pread(10000, base)
    out["zeroed"] = data == b"\\xaa" * 3000 + b"\\0" * 4000 + b"\\xaa" * 3000
    h.trim(1 << 20, base + (1 << 20), nbd.CMD_FLAG_FUA)
    h.flush()
    out["after_errors_still_works"] = h.pread(3, base) == b"\\xaa" * 3
    h.shutdown()
    print(json.dumps(out))
    """
)


def test_nbdsh_protocol_edge_cases(uri: str) -> None:
    need("nbdsh")
    # nbdsh runs `python3 -m nbd`; the libnbd bindings live in the system Python
    env = dict(os.environ, URI=uri, PATH="/usr/bin:" + os.environ.get("PATH", ""))
    out = json.loads(run(["nbdsh", "-c", NBDSH_SCRIPT], env=env).strip().splitlines()[-1])
    assert out == {
        "list": ["remem"],
        "meta_context": "ENOTSUP",
        "info_unknown": "ENOENT",
        "info_size": SIZE,
        "structured": True,
        "block_sizes": [1, 4096, 32 * MiB],
        "read_past_end": "EINVAL",
        "write_past_end": "ENOSPC",
        "trim_past_end": "EINVAL",
        "zero_past_end": "ENOSPC",
        "read_offset_past_end": "EINVAL",
        "read_too_big": "EINVAL",
        "write_no_hole_flag": "EINVAL",
        "read_fast_zero_flag": "EINVAL",
        "trim_req_one_flag": "EINVAL",
        "read_fua": "ok",
        "read_df": "ok",
        "cache": "EINVAL",
        "zeroed": True,
        "after_errors_still_works": True,
    }


def scrape(service: ServiceProcess) -> dict[str, float]:
    return scrape_metrics(service.ready["metrics"])  # the ready line names /metrics


def test_metrics_endpoint(service: ServiceProcess) -> None:
    # The service is shared by the module's tests, so counters are compared across this test.
    before = scrape(service)
    with RawNbd.unix(socket_of(service)).connect() as raw:
        raw.write(800 * MiB, b"m" * 4096)
        assert raw.read(800 * MiB, 4096) == b"m" * 4096
    samples = scrape(service)
    writes_ok = 'client_nbd_requests_total{cmd="write",result="ok"}'
    assert samples[writes_ok] == before[writes_ok] + 1
    trims_invalid = 'client_nbd_requests_total{cmd="trim",result="invalid"}'
    assert samples[trims_invalid] == before[trims_invalid]  # created up front, no trim sent
    assert (
        samples["client_nbd_bytes_written_total"] == before["client_nbd_bytes_written_total"] + 4096
    )
    assert samples['client_nbd_request_duration_seconds_bucket{cmd="read",le="+Inf"}'] >= 1
    assert 'client_nbd_malformed_requests_total{reason="bad_request_magic"}' in samples
    assert "client_nbd_connections" in samples and "client_nbd_inflight_requests" in samples


def test_tcp_listener_with_port_zero(tmp_path: Path) -> None:
    args = client_args(tmp_path / "t.sock", "64MiB", "--nbd-listen", "127.0.0.1:0")
    server = start_service("client-tcp", args)
    try:
        host, port = server.ready["nbd_tcp"].rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        info = json.loads(run([need("nbdinfo"), "--json", f"nbd://127.0.0.1:{port}/remem"]))
        assert info["exports"][0]["export-size"] == 64 * MiB
    finally:
        assert server.stop() == 0, server.log()
    only_tcp = start_service(
        "client-tcp-only",
        ["client", "--size", "1MiB", "--nbd-listen", "127.0.0.1:0", "--metrics-port", "0",
         "--export-name", "swap0"],
    )  # fmt: skip
    try:
        assert only_tcp.ready["nbd_uri"] == f"nbd://{only_tcp.ready['nbd_tcp']}/swap0"
        qemu_io(only_tcp.ready["nbd_uri"], "write -P 0x42 0 4096", "read -P 0x42 0 4096")
    finally:
        assert only_tcp.stop() == 0, only_tcp.log()


def test_sigterm_with_a_client_connected_exits_zero(tmp_path: Path) -> None:
    server = start_service("client-term", client_args(tmp_path / "x.sock", "64MiB"))
    with RawNbd.unix(socket_of(server)).connect() as raw:
        raw.write(0, b"q" * 4096)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=15) == 0, server.log()
        assert raw.closed_by_server()
    assert not (tmp_path / "x.sock").exists()
    assert "stopped" in server.log()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "1GiB"], "--nbd-socket"),
        (["--size", "lots", "--nbd-socket", "/tmp/x"], "--size"),
        (["--size", "0", "--nbd-socket", "/tmp/x"], "--size"),
        (["--size", "1GiB", "--nbd-listen", "nohost"], "--nbd-listen"),
        (["--size", "1GiB", "--nbd-socket", "/tmp/x", "--metrics-port", "70000"], "--metrics-port"),
        (["--nbd-socket", "/tmp/x"], "--size"),
        (["--size", "1GiB", "--nbd-socket", "/tmp/x", "--backend", "disk"], "--backend"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "remem_client", *args], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_socket_in_use_is_refused(service: ServiceProcess, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "remem_client", *client_args(Path(socket_of(service)))[1:]],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    assert "in use" in result.stderr


def run_client(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "remem_client", *args], capture_output=True, text=True, timeout=60
    )


def test_a_path_or_key_that_cannot_be_used_exits_2_with_one_line(tmp_path: Path) -> None:
    not_a_socket = tmp_path / "file"
    not_a_socket.write_text("")
    taken = run_client(*client_args(not_a_socket, "1MiB")[1:], "--no-lock-memory")
    assert taken.returncode == 2, taken
    assert taken.stderr == f"remem client: --nbd-socket {not_a_socket} exists and is not a socket\n"
    short_key = tmp_path / "page.key"
    short_key.write_bytes(b"12345")
    short_key.chmod(0o600)
    remote = run_client(
        *client_args(tmp_path / "r.sock", "1MiB")[1:], "--no-lock-memory", "--backend", "remote",
        "--placement", "tcp://127.0.0.1:1", "--page-key", str(short_key),
    )  # fmt: skip
    assert remote.returncode == 2, remote
    # (a key without its nonce state: the first of the page key's checks)
    assert remote.stderr.startswith(f"remem client: page key {short_key} has no nonce state ")
    assert remote.stderr.count("\n") == 1
    assert not (tmp_path / "r.sock").exists()


def test_a_taken_metrics_port_exits_1_with_one_line(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_client(
            "--size", "1MiB", "--nbd-socket", str(tmp_path / "m.sock"), "--no-lock-memory",
            "--metrics-port", str(port),
        )  # fmt: skip
    assert result.returncode == 1, result
    assert result.stderr == (
        f"remem client: cannot serve metrics on port {port}: [Errno 98] Address already in use\n"
    )


def test_export_name_mismatch_over_the_old_handshake_closes(service: ServiceProcess) -> None:
    with RawNbd.unix(socket_of(service)).connect() as raw:
        raw.write(SIZE - 1, b"\xee")
    with RawNbd.unix(socket_of(service)) as raw:
        raw.greeting()
        raw.option(wire.Opt.EXPORT_NAME, b"other")
        assert raw.closed_by_server()
    with RawNbd.unix(socket_of(service)) as raw:
        raw.greeting(client_flags=1)  # no NO_ZEROES: 124 zero bytes follow the reply
        raw.option(wire.Opt.EXPORT_NAME, b"")
        reply = raw.recv_exact(10 + 124)
        assert int.from_bytes(reply[:8], "big") == SIZE and reply[10:] == bytes(124)
        raw.structured = False
        assert raw.read(SIZE - 1, 1) == b"\xee"
