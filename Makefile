# The two commands README promises: `make run` and `make test`. Both build what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Two stamps: `make run` installs what serving needs, everything else the dev extras as well.
RUNTIME := $(VENV)/.installed-runtime
INSTALLED := $(VENV)/.installed-dev
ARGS ?=

.PHONY: run test lint check-protos proto deps e2e image-test bench soak soak-ci clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(RUNTIME): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(INSTALLED): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@ $(RUNTIME)

## Regenerate the protobuf/gRPC stubs from protos/ (they are checked in).
proto: $(INSTALLED)
	PYTHON=$(PY) scripts/gen_protos.sh

check-protos: $(INSTALLED)
	PYTHON=$(PY) scripts/check-protos.sh

## Serve etcd v3 on 127.0.0.1:2379 with the data in ./db/state.db (ARGS='--flag value' to change).
run: $(RUNTIME)
	$(VENV)/bin/kine-server $(ARGS)

## Install the real etcd, PostgreSQL and MariaDB the tests start (as root; otherwise says what
## is missing).
deps:
	scripts/test-deps.sh

lint: $(INSTALLED)
	$(VENV)/bin/ruff check src tests bench e2e
	$(VENV)/bin/mypy

## The whole suite: stubs up to date, lint and types, then every test on SQLite and PostgreSQL
## (and the differential, watch, lease, compaction and multi-instance tests on MariaDB).
test: $(INSTALLED) deps check-protos lint
	$(PY) -m pytest

## End to end: a real kube-apiserver 1.20 on kine-server, SQLite, PostgreSQL and MariaDB. The
## apiserver is built once from Debian's source package (about 10 minutes) and cached in ~/.cache/kine-server.
e2e: $(INSTALLED) deps
	scripts/kube-apiserver.sh >/dev/null
	$(PY) e2e/run.py --db all

## The container image, built from the Dockerfile and run with podman as the README runs it, K3s's
## move onto it with a real kube-apiserver, the systemd unit under a real systemd. As root: the
## first run installs podman and makes a local debian:bookworm-slim (scripts/podman-setup.sh).
image-test: $(INSTALLED) deps
	scripts/kube-apiserver.sh >/dev/null
	scripts/podman-setup.sh >/dev/null
	$(PY) -m pytest -m image tests/test_image.py

## Side-by-side benchmark against a real etcd and the no-storage floor (ARGS=--pg adds
## PostgreSQL, ARGS=--mysql MariaDB). Workload 9 runs a kube-apiserver: built once as for
## `make e2e`.
bench: $(INSTALLED) deps
	scripts/kube-apiserver.sh >/dev/null
	$(PY) bench/run.py $(ARGS)

## CI's bounded soak (a few minutes): kill -9 rounds and PostgreSQL fault cycles, fuzz seeds,
## linearizability runs under faults and compaction failing at random, on SQLite and PostgreSQL.
soak-ci: $(INSTALLED) deps
	KINE_SOAK_ROUNDS=2 KINE_SOAK_CYCLES=3 KINE_FUZZ_ROUNDS=2 KINE_LIN_SECONDS=10 \
	KINE_SOAK_SECONDS=30 $(PY) -m pytest -m slow -q tests/test_soak_faults.py \
	tests/test_fuzz_differential.py tests/test_linearizability.py tests/test_compaction.py

## Long soak tests, excluded from `make test`.
soak: $(INSTALLED) deps
	$(PY) -m pytest -m slow

clean:
	rm -rf $(VENV) db .pytest_cache .mypy_cache .ruff_cache
