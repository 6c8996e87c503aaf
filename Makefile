# podwire: `make demo` and `make test` are the whole set-up on a fresh Debian machine (as root).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEB_PACKAGES := iproute2 nftables libnftables1 iptables containernetworking-plugins iputils-ping procps curl util-linux python3 iperf3
PYTEST_ARGS ?=
# the runtime of tests/integration/test_containerd.py and tests/k8s
DEB_PACKAGES += containerd runc

.PHONY: deps system-deps venv test unit integration e2e demo bench bench-datapath bench-emulator-sg lint clean-netns

deps: system-deps venv

# Debian packages, installed only when one is missing.
system-deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

# tests/k8s (a real cluster: mostly waiting on kubelet and the API server) runs beside the rest
# in a pytest of its own, its report printed after the rest's; either failing fails the target.
# An interrupted run stops it with SIGINT, so its cluster is torn down.
test: deps
	@log=$$(mktemp); \
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests/k8s >$$log 2>&1 & k8s=$$!; \
	trap 'kill -INT $$k8s 2>/dev/null; wait $$k8s; rm -f $$log' INT TERM; \
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) --ignore=tests/k8s; rest=$$?; \
	wait $$k8s; k8s_rc=$$?; echo "== tests/k8s (run alongside)"; cat $$log; rm -f $$log; \
	exit $$(( rest || k8s_rc ))

unit: deps
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

integration: deps
	$(PY) -m pytest -q tests/integration $(PYTEST_ARGS)

e2e: deps
	$(PY) -m pytest -q tests/e2e $(PYTEST_ARGS)

demo: deps
	$(PY) -m tests.demo

bench: deps
	$(PY) -m bench.cni_latency

# Pod-to-pod TCP/UDP bandwidth (iperf3) for podwire, ptp, bridge and a bare veth; idle agent.
bench-datapath: deps
	$(PY) -m bench.datapath

# The emulated VPC's security groups: rule set at 1,000 ENIs, one ENI's change, TCP on/off.
bench-emulator-sg: deps
	$(PY) -m bench.emulator_sg

lint: deps
	$(PY) -m pip install -q ruff mypy
	$(VENV)/bin/ruff check agent rpc netlink cloud cni_client tests bench
	$(VENV)/bin/ruff format --check agent rpc netlink cloud cni_client tests bench
	$(VENV)/bin/mypy

# Removes namespaces and links a crashed test or demo left behind (names start with pw-).
clean-netns:
	$(PY) -m tests.cleanup

# The GKE VPC-native story: pod addresses from alias IP ranges read from the GCE metadata server.
.PHONY: demo-gke
demo-gke: deps
	$(PY) -m tests.demo --gke

# Kubernetes' server binaries, etcd and the test images for tests/k8s and the containerd test:
# built once per machine and cached under ~/.cache/podwire (tests/k8s/artifacts.py).
.PHONY: k8s-artifacts k8s
k8s-artifacts: deps
	$(PY) -m tests.k8s.artifacts

test integration: k8s-artifacts

k8s: deps k8s-artifacts
	$(PY) -m pytest -q tests/k8s $(PYTEST_ARGS)
