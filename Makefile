# remem: every entry point is a make target; CI calls `make test` (see .ci/run).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest
STAMP := $(VENV)/.installed
# Debian packages the tests drive as real peers: NBD clients, nbdkit as the
# reference server, fio, a Prometheus server, iproute2 for network namespaces.
DEB_PACKAGES := nbdkit libnbd-bin python3-libnbd qemu-utils fio prometheus gcc iproute2 fuse3 util-linux systemd linux-perf
DEB_COMMANDS := nbdkit nbdinfo nbdcopy nbdsh qemu-io fio prometheus promtool gcc ip nbdfuse losetup systemd-analyze perf
STATE_DIR ?= $(CURDIR)/state

.PHONY: install deps lint typecheck test test-unit test-integration test-slow test-root test-fuzz \
        test-faults bench-pageserver bench-nbd bench-cluster bench-mirror bench-encryption \
        bench-swap bench-phases bench up clean deploy-check

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Installs the Debian packages only when one of their commands is missing, so a
# warm machine pays nothing and a fresh one needs no manual step.
deps:
	@missing=""; for c in $(DEB_COMMANDS); do command -v $$c >/dev/null || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages (missing:$$missing)"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(DEB_PACKAGES) >/dev/null; \
	fi

lint: install
	$(VENV)/bin/ruff check services tests
	$(VENV)/bin/ruff format --check services tests

typecheck: install
	$(VENV)/bin/mypy

# The default suite: unit + integration, real processes on loopback.
test: deps install lint typecheck deploy-check
	$(PYTEST) -m "not slow and not root and not bench and not faults" -q --ignore=tests/deploy

# What an operator deploys, checked with the real tools (tests/deploy): hadolint on every
# Dockerfile, compose config, Helm render + lint + kubernetes-validate for every values file,
# promtool rule tests, every metric the dashboard and the alerts query on a real Prometheus
# scraping `remem up`, systemd-analyze verify on the client host units. Part of `make test`.
deploy-check: deps install
	$(PYTEST) tests/deploy -m "not slow and not root" -q

test-unit: install
	$(PYTEST) tests/unit -q

test-integration: deps install
	$(PYTEST) tests/integration -m "not slow and not root and not bench" -q

test-slow: deps install
	$(PYTEST) -m "slow and not root and not faults" -q

test-root: deps install
	$(PYTEST) -m "root and not faults and not vm" -q

# Processes killed, paused, cut off (network namespaces: those tests need root and skip
# without it) and arenas corrupted, under verifying NBD workloads; see tests/faults.
test-faults: deps install
	$(PYTEST) tests/faults -m faults -q --durations=0

# The fuzzers with large counts (the default suite runs the same tests small): 3000 examples
# per NBD test and backend (handshakes + request bursts on the memory and the remote
# backend: 12000), and every ZeroMQ fuzzer at 5x its default; a "fuzz summary" at the end
# gives the examples sent and the rejections each service counted. ~10 min on 2 cores.
FUZZ_NBD_EXAMPLES ?= 3000
FUZZ_ZMQ_SCALE ?= 5
test-fuzz: deps install
	REMEM_NBD_FUZZ_EXAMPLES=$(FUZZ_NBD_EXAMPLES) REMEM_NBD_FUZZ_BACKENDS="memory remote" \
	  REMEM_ZMQ_FUZZ_SCALE=$(FUZZ_ZMQ_SCALE) \
	  $(PYTEST) -m "fuzz and not slow and not root" -q --timeout 1800

bench-pageserver: install
	$(PY) -m remem_pageserver.bench

# remem's NBD front end (memory backend) against nbdkit memory, same run, fio's nbd engine.
bench-nbd: deps install
	$(PY) -m remem_client.bench_nbd

# The whole system (remem up: 2 replicas over 3 page servers) against nbdkit memory.
bench-cluster: deps install
	$(PY) -m remem_client.bench_nbd --target cluster

# What the local mirror costs on the write path: remem up with and without it, same run.
bench-mirror: deps install
	$(PY) -m remem_client.bench_nbd --target mirror --size 512M

# What page encryption costs: remem up with and without it (--no-encrypt-pages), same run.
bench-encryption: deps install
	$(PY) -m remem_client.bench_nbd --target encryption

# The Linux kernel swapping a 1 GiB hog (128 MiB of RAM) to remem up and to nbdkit memory,
# same run, every byte verified (root: nbdfuse, a loop device, a memory cgroup).
bench-swap: deps install
	$(PY) -m tests.system.bench_swap

# Where a 4 KiB read's time goes at QD1: a scheduler trace (perf, root); each request split into
# each process's time on a CPU and the time none runs (the hops between processes).
bench-phases: deps install
	$(PY) -m tests.bench.phases

# Every benchmark in one run (tests/bench): fio against nbdkit memory and remem up at k=1 and
# k=2 (and k=2 without its mirror), the client's metadata, a page server SIGKILLed under fio
# (failover stall, re-replication MB/s), page server RAM overhead, and as root the kernel
# swapping a hog to nbdkit and to remem; writes BENCHMARKS.md and BENCHMARKS.png with each
# target of issue 14 beside its row. ~11 min on 2 cores; BENCH_ARGS for options (--help).
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $@

bench: deps install $(BENCH_STAMP)
	$(PY) -m tests.bench $(BENCH_ARGS)

# What only the guest-kernel test needs (qemu is large, so not in DEB_PACKAGES): qemu, the
# kernel's nbd-client, a static busybox and libc.a for the guest's initramfs.
VM_DEB_PACKAGES := qemu-system-x86 nbd-client busybox-static libc6-dev
VM_DEB_COMMANDS := qemu-system-x86_64 nbd-client
.PHONY: deps-vm test-vm
deps-vm: deps
	@missing=""; for c in $(VM_DEB_COMMANDS); do command -v $$c >/dev/null || missing="$$missing $$c"; done; \
	{ [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1; } || missing="$$missing busybox-static"; \
	[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || missing="$$missing libc.a"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages (missing:$$missing)"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(VM_DEB_PACKAGES) >/dev/null; \
	fi

# A restart of the remem client under swap loses nothing: Debian's kernel in a qemu guest
# (TCG) swaps a 320 MiB hog (128 MiB of RAM) to remem through the units of deploy/systemd,
# the client is restarted twice (idle, then under page-ins: it hands its NBD connection to
# the next process through the unit's file-descriptor store), every byte is verified.
# Downloads the kernel package once (cache: REMEM_VM_CACHE). ~3 min here.
test-vm: deps-vm install
	$(PYTEST) tests/system/vm -m vm -q -rxX --durations=0

up: install
	$(VENV)/bin/remem up --state-dir $(STATE_DIR)

# deploy/compose.yaml for real: every image built, the stack up (without Grafana), fio
# verifying through the client's NBD port from the host while a page server container is
# SIGKILLed via the Docker API; containers, volumes and networks removed even on failure
# (tests/system/compose_stack.py). Needs Docker with its compose plugin, or Podman
# (apt-get install podman; podman-compose comes with `make install`). Not in `make test`.
.PHONY: compose-test
compose-test: deps install
	$(PY) -m tests.system.compose_stack

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
