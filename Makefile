# remem: every entry point is a make target; CI calls `make test` (see .ci/run).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest
STAMP := $(VENV)/.installed
# Debian packages the tests drive as real peers: NBD clients, nbdkit as the
# reference server, fio, a Prometheus server, iproute2 for network namespaces.
DEB_PACKAGES := nbdkit libnbd-bin python3-libnbd qemu-utils fio prometheus gcc iproute2 fuse3 util-linux
DEB_COMMANDS := nbdkit nbdinfo nbdcopy nbdsh qemu-io fio prometheus gcc ip nbdfuse losetup
STATE_DIR ?= $(CURDIR)/state

.PHONY: install deps lint typecheck test test-unit test-integration test-slow test-root test-fuzz \
        test-faults bench-pageserver bench-nbd bench-cluster bench-mirror bench-encryption \
        bench-swap up clean

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
test: deps install lint typecheck
	$(PYTEST) -m "not slow and not root and not bench and not faults" -q

test-unit: install
	$(PYTEST) tests/unit -q

test-integration: deps install
	$(PYTEST) tests/integration -m "not slow and not root and not bench" -q

test-slow: deps install
	$(PYTEST) -m "slow and not root and not faults" -q

test-root: deps install
	$(PYTEST) -m "root and not faults" -q

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

up: install
	$(VENV)/bin/remem up --state-dir $(STATE_DIR)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
