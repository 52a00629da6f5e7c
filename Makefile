# Two commands do all set-up on a fresh machine (Python >= 3.11 with venv):
#   make demo   - create .venv, install, run the demo on the embedded broker
#   make test   - create .venv, install (+ promtool/prometheus when root), run the tests
#   (make test-unit runs the fast unit tests alone)
# Both install the worker, dev and test extras (the base package is the clients alone).
VENV ?= .venv
PY := $(VENV)/bin/python
# Real behaviour logs for the optional real-data tests (skipped when absent).
SHARED_DATA ?= ../shared/data

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

.PHONY: install demo test test-unit system-deps bench
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/profilestream demo

# promtool and the Prometheus server come from Debian's `prometheus` package.
system-deps:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; \
	  else echo "note: install Debian's 'prometheus' package for the promtool/Prometheus tests"; fi; }

PYTEST = PROFILESTREAM_SHARED_DATA=$$( [ -d "$(SHARED_DATA)" ] && cd "$(SHARED_DATA)" && pwd ) $(PY) -m pytest -q

# Everything: tests/unit and tests/integration (worker processes on the embedded broker).
test: $(VENV)/.installed system-deps
	$(PYTEST) $(PYTEST_ARGS)

# The fast tests alone: real RocksDB, the real model, in-process; no broker, no worker process.
test-unit: $(VENV)/.installed
	$(PYTEST) tests/unit $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(VENV)/bin/profilestream bench
