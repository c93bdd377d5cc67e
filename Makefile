# make run: install (once) and start the server.  make test: install (once) and run the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.runtime-installed
DEV := $(VENV)/.dev-installed

.PHONY: run test bench model clean

run: $(RUNTIME) model
	$(PY) main.py

test: $(DEV) model
	$(PY) -m pytest

bench: $(DEV) model
	$(PY) bench/bench.py

model: $(RUNTIME)
	@$(PY) scripts/install_model.py

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(RUNTIME): requirements.txt | $(PY)
	@echo ">>> installing runtime requirements; llama-cpp-python compiles llama.cpp from source:"
	@echo ">>> about 5 minutes on 2 cores the first time (later runs reuse the built wheel)"
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $@

$(DEV): requirements-dev.txt $(RUNTIME)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	@touch $@

clean:
	rm -rf $(VENV)
