# Two entry points, each doing all the set-up it needs on a fresh machine:
#   make demo   install into .venv and run the main job on the embedded default model
#   make test   install into .venv (with the oracles) and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qcbguard-installed

.PHONY: demo test lint bench clean prometheus

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch first (a wheel on disk on these machines): a bare `torch` requirement pulls a CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/qcbguard demo

# A real Prometheus server and promtool for the monitoring tests (Debian's package; root or sudo).
prometheus:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -q prometheus >/dev/null

test: $(STAMP) prometheus
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/bench_reference_vs_oracle.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
