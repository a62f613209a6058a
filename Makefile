# Targets CI runs too. VENV can point at an existing virtualenv.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: help install lab test unit lint bench soak demo appliance clean

help:
	@echo "make install   create $(VENV) and install the package with test tools"
	@echo "make lab       install and start the local Incus lab (root; Debian bookworm)"
	@echo "make test      unit, snapshot and integration tests (integration needs the lab)"
	@echo "make unit      the fast suite: no root, no Incus, no Caddy (fakes), with coverage"
	@echo "make lint      ruff and mypy"
	@echo "make bench     benchmarks under bench/ (needs the lab)"
	@echo "make soak      randomized soak of watch (bench/soak.py; root, the lab; ~15 min; kills incusd)"
	@echo "make demo      lab + labelled instances + Caddy, render, curl through Caddy"
	@echo "make appliance the edge image (root; Debian bookworm) into dist/appliance, added to"
	@echo "               the SimpleStreams tree dist/simplestreams"

$(PY):
	python3 -m venv $(VENV)

install: $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'

lab:
	-bash scripts/lab.sh up  # tolerated: without a lab the integration tests skip (fail under CI=true)

test: install lab
	$(PY) -m pytest

unit: install
	$(PY) -m pytest -m "not integration and not caddy and not root" \
		--cov=incus_caddyfile --cov-report=term-missing:skip-covered

lint: install
	$(VENV)/bin/ruff check incus_caddyfile tests bench
	$(VENV)/bin/mypy

bench: install lab
	$(PY) bench/render.py
	$(PY) bench/watch.py
	$(PY) bench/traffic.py
	$(PY) bench/routing.py

soak: install lab
	$(PY) bench/soak.py

demo: install lab
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/demo.sh

appliance: install
	PYTHON=$(abspath $(PY)) bash scripts/appliance.sh build

clean:
	rm -rf $(VENV) dist build .pytest_cache .mypy_cache .ruff_cache
