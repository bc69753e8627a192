"""Build and boot a small Linux guest that swaps to an NBD export on the host (qemu, TCG).

The guest is Debian's stock kernel with its real `nbd` driver, and an initramfs made here
from the host's Debian packages:

* the kernel package that linux-image-amd64 depends on, fetched with `apt-get download` and
  cached (REMEM_VM_CACHE, default $XDG_CACHE_HOME/remem-vm or /tmp/remem-vm-cache): vmlinuz
  and the modules nbd, virtio_pci, virtio_net with their dependencies;
* busybox (busybox-static) for the small tools, dash as /bin/sh, nbd-client (nbd-client)
  and util-linux's swapon/swapoff/mkswap with their shared libraries, the hog (hog.c,
  gcc -static), /init (init.sh), and the client host's `remem-swap` script at the path its
  unit runs it from.

The initramfs is a newc cpio written by `NewcArchive` (no cpio tool), rebuilt per run (about
a second); only the kernel is cached. `Guest` runs qemu with the serial console on a pipe:
the host reads the console line by line and writes lines to the guest's /dev/console. qemu's
user network shows the host's 127.0.0.1 to the guest as 10.0.2.2. KVM does not work on these
machines (a nested host); TCG does, slowly: a guest second is a few host seconds.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import lzma
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
GUEST_MODULES = ("virtio_pci", "virtio_net", "nbd")
# What the guest runs, from where it takes it on the host. /bin/sh is dash, as on a Debian
# host: busybox's shell runs its own applets before anything on PATH, and its swapon has no
# -p (priority), so the swap script gets util-linux's tools the way a client host has them.
GUEST_TOOLS = {
    "/bin/sh": "dash",
    "/usr/sbin/nbd-client": "nbd-client",
    "/usr/sbin/swapon": "swapon",
    "/usr/sbin/swapoff": "swapoff",
    "/usr/sbin/mkswap": "mkswap",
}
BUSYBOX = Path("/bin/busybox")
LIBC_STATIC = Path("/usr/lib/x86_64-linux-gnu/libc.a")
QEMU = "qemu-system-x86_64"
# Debian packages that bring what this module needs (make deps-vm installs them).
VM_PACKAGES = ("qemu-system-x86", "nbd-client", "busybox-static", "gcc", "libc6-dev")

# Console lines that mean the guest kernel is in trouble: the test fails on the first one.
# (Not every "Call Trace:": an atomic page allocation failing under swap pressure prints one
# too, as a warning, and the I/O is retried.)
KERNEL_TROUBLE = re.compile(
    r"Kernel panic|BUG: |Oops: |general protection fault|blocked for more than"
)


class VmError(Exception):
    """The guest could not be built or did not do what was expected; the message says why."""


def missing_tools() -> list[str]:
    """What this host lacks to build and boot the guest (empty when all is there)."""
    missing = [
        tool
        for tool in (QEMU, "gcc", "apt-get", "apt-cache", "dpkg-deb", *GUEST_TOOLS.values())
        if shutil.which(tool) is None
    ]
    if not BUSYBOX.exists() or _is_dynamic(BUSYBOX):
        missing.append("static /bin/busybox (busybox-static)")
    if not LIBC_STATIC.exists():
        missing.append(f"{LIBC_STATIC} (libc6-dev)")
    return missing


def _is_dynamic(binary: Path) -> bool:
    with binary.open("rb") as f:
        return b"/lib64/ld-linux" in f.read(4096)


def cache_dir() -> Path:
    """Where the downloaded kernel is kept between runs."""
    if os.environ.get("REMEM_VM_CACHE"):
        return Path(os.environ["REMEM_VM_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "remem-vm"
    return Path("/tmp/remem-vm-cache")


def _run(args: list[str], *, cwd: Path | None = None, timeout: float = 600) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise VmError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder per cache at a time (two test runs may share it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def kernel_package() -> str:
    """The versioned kernel package behind linux-image-amd64, e.g. linux-image-6.1.0-57-amd64."""
    for attempt in range(2):
        out = subprocess.run(
            ["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True
        ).stdout
        match = re.search(r"Depends: (linux-image-[0-9]\S*)", out)
        if match:
            return match.group(1)
        if attempt == 0:  # no package lists yet on a fresh machine
            _run(["apt-get", "update", "-qq"])
    raise VmError("apt-cache knows no linux-image-amd64 (apt-get update?)")


def fetch_kernel(cache: Path | None = None) -> Path:
    """Download and unpack the kernel once; returns its folder (vmlinuz, modules/, version).

    modules/load.order lists the .ko files of GUEST_MODULES and their dependencies in an
    order insmod accepts.
    """
    cache = cache or cache_dir()
    package = kernel_package()
    folder = cache / package
    done = folder / "complete"
    with _locked(cache / ".lock"):
        if done.exists():
            return folder
        shutil.rmtree(folder, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp_name:
            tmp = Path(tmp_name)
            tmp.chmod(0o755)  # apt's download sandbox user must be able to write here
            _run(["apt-get", "-o", "APT::Sandbox::User=root", "download", package], cwd=tmp)
            (deb,) = tmp.glob("*.deb")
            tree = tmp / "tree"
            _run(["dpkg-deb", "-x", str(deb), str(tree)])
            (version,) = [p.name for p in (tree / "lib/modules").iterdir()]
            (folder / "modules").mkdir(parents=True)
            shutil.copy(tree / f"boot/vmlinuz-{version}", folder / "vmlinuz")
            order = _copy_modules(tree / "lib/modules" / version, folder / "modules")
            (folder / "modules/load.order").write_text("".join(f"{m}\n" for m in order))
            (folder / "version").write_text(version + "\n")
        done.write_text(package + "\n")
    return folder


def _copy_modules(source: Path, target: Path) -> list[str]:
    """Copy GUEST_MODULES and what they depend on (modinfo's depends=); returns load order."""
    paths: dict[str, Path] = {}
    for path in source.joinpath("kernel").rglob("*.ko*"):
        paths[path.name.split(".ko")[0].replace("-", "_")] = path
    builtin = {
        line.rsplit("/", 1)[-1].split(".ko")[0].replace("-", "_")
        for line in (source / "modules.builtin").read_text().split()
    }
    order: list[str] = []
    seen: set[str] = set()

    def want(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in paths:
            raise VmError(f"kernel module {name} not found")
        data = paths[name].read_bytes()
        if paths[name].name.endswith(".xz"):
            data = lzma.decompress(data)
        elif not paths[name].name.endswith(".ko"):
            raise VmError(f"cannot unpack {paths[name].name}")
        match = re.search(rb"(?:^|\0)depends=([^\0]*)\0", data)
        for dep in match.group(1).decode().split(",") if match else []:
            if dep:
                want(dep)
        (target / f"{name}.ko").write_bytes(data)
        order.append(f"{name}.ko")

    for module in GUEST_MODULES:
        want(module)
    return order


class NewcArchive:
    """A cpio archive in the kernel's initramfs format (newc), built in memory."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._inode = 1
        self._dirs: set[str] = {""}

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = (
            self._inode, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0
        )  # fmt: skip
        self._inode += 1
        header = b"070701" + b"".join(b"%08X" % value for value in fields) + encoded
        self._parts.append(header + b"\0" * (-len(header) % 4))
        self._parts.append(data + b"\0" * (-len(data) % 4))

    def _parents(self, name: str) -> None:
        parent = name.rpartition("/")[0]
        if parent not in self._dirs:
            self.directory(parent)

    def directory(self, name: str) -> None:
        name = name.strip("/")
        if name in self._dirs:
            return
        self._parents(name)
        self._dirs.add(name)
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        self._parents(name)
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        self._parents(name)
        self._entry(name, 0o120777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        name = name.strip("/")
        self._parents(name)
        self._entry(name, 0o020000 | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self._parts)


def shared_libraries(binary: str) -> list[str]:
    """The absolute paths of the libraries `binary` loads, as ldd resolves them."""
    return re.findall(r"(/\S+) \(0x", _run(["ldd", binary]))


def build_initramfs(kernel: Path, out: Path, work: Path) -> Path:
    """Write the guest's initramfs to `out` (gzip'd newc); `work` is a scratch folder."""
    archive = NewcArchive()
    for folder in ("dev", "proc", "sys", "tmp", "run", "etc", "bin", "sbin", "usr/bin"):
        archive.directory(folder)
    archive.char_device("dev/console", 5, 1)
    archive.char_device("dev/null", 1, 3, 0o666)
    archive.file("init", (HERE / "init.sh").read_bytes(), 0o755)
    archive.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    for applet in _run([str(BUSYBOX), "--list"]).split():
        if applet not in ("busybox", "sh"):
            archive.symlink(f"bin/{applet}", "busybox")
    libraries: set[str] = set()
    for guest_path, tool in GUEST_TOOLS.items():
        host_path = shutil.which(tool)
        assert host_path is not None
        archive.file(guest_path, Path(host_path).read_bytes(), 0o755)
        libraries.update(shared_libraries(host_path))
    for library in sorted(libraries):
        archive.file(library, Path(library).resolve().read_bytes(), 0o755)
    archive.file(
        "usr/local/lib/remem/remem-swap", (REPO / "deploy/systemd/remem-swap").read_bytes(), 0o755
    )
    hog = work / "hog"
    _run(["gcc", "-O2", "-static", "-s", "-o", str(hog), str(HERE / "hog.c")])
    archive.file("usr/local/bin/hog", hog.read_bytes(), 0o755)
    for module in (kernel / "modules").iterdir():
        archive.file(f"lib/modules/{module.name}", module.read_bytes())
    out.write_bytes(gzip.compress(archive.finish(), compresslevel=6, mtime=0))
    return out


class Guest:
    """One qemu guest: its console as lines the host waits on, and a way to type a line."""

    def __init__(
        self,
        kernel: Path,
        initramfs: Path,
        append: list[str],
        log_path: Path,
        *,
        memory_mib: int = 128,
    ) -> None:
        self.log_path = log_path
        self.args = [
            QEMU,
            "-name", "remem-vm",
            "-machine", "q35,accel=tcg",
            "-cpu", "max",
            "-smp", "1",
            "-m", str(memory_mib),
            "-nodefaults", "-nographic", "-no-reboot",
            "-serial", "stdio", "-monitor", "none",
            "-kernel", str(kernel / "vmlinuz"),
            "-initrd", str(initramfs),
            # panic=-1: a panic reboots at once, and -no-reboot turns that into qemu's exit.
            "-append", " ".join(["console=ttyS0", "panic=-1", "quiet", *append]),
            "-netdev", "user,id=n0",
            "-device", "virtio-net-pci,netdev=n0,romfile=",
        ]  # fmt: skip
        self.lines: list[str] = []
        self._cursor = 0
        self._changed = threading.Condition()
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._started = 0.0

    def start(self) -> None:
        self._started = time.monotonic()
        self._proc = subprocess.Popen(
            self.args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        with self.log_path.open("a") as log:
            for raw in self._proc.stdout:
                line = raw.decode(errors="replace").rstrip("\r\n")
                log.write(f"[{time.monotonic() - self._started:7.2f}] {line}\n")
                log.flush()
                with self._changed:
                    self.lines.append(line)
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def tail(self, count: int = 40) -> str:
        with self._changed:
            return "\n".join(self.lines[-count:])

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The next console line matching `pattern` (lines before it are consumed).

        Raises:
            VmError: the kernel reported trouble (panic, oops, hung task), qemu exited, or
                `timeout` seconds passed first; the message has the console's last lines.
        """
        wanted = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                while self._cursor < len(self.lines):
                    line = self.lines[self._cursor]
                    self._cursor += 1
                    if KERNEL_TROUBLE.search(line):
                        raise VmError(f"guest kernel trouble: {line}\n{self._tail_locked()}")
                    match = wanted.search(line)
                    if match:
                        return match
                if self._reader is not None and not self._reader.is_alive():
                    raise VmError(f"qemu exited before /{pattern}/ appeared\n{self._tail_locked()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise VmError(
                        f"no /{pattern}/ on the console after {timeout:.0f}s\n"
                        + self._tail_locked()
                    )
                self._changed.wait(min(left, 1.0))

    def _tail_locked(self, count: int = 40) -> str:
        return "--- console tail ---\n" + "\n".join(self.lines[-count:])

    def type_line(self, text: str) -> None:
        """Write `text` and a newline to the guest's console (its /dev/console input)."""
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(text.encode() + b"\n")
        self._proc.stdin.flush()

    def wait_exit(self, timeout: float) -> int:
        assert self._proc is not None
        try:
            code = self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise VmError(f"qemu still running after {timeout:.0f}s\n{self.tail()}") from None
        if self._reader is not None:
            self._reader.join(timeout=10)
        return code

    def kill(self) -> None:
        """Stop qemu now (teardown); a no-op once it has exited."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait(timeout=30)
        if self._reader is not None:
            self._reader.join(timeout=10)
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):  # a line typed to a guest that is gone
                    pipe.close()
