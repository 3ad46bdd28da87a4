# One-command set-up: every target creates the virtual environment if it is missing.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# FBGEMM build for this machine: fbgemm-gpu-cpu here; fbgemm-gpu (CUDA) for `make venv-gpu`.
FBGEMM ?= fbgemm-gpu-cpu==1.8.0
DEMO_DIR ?= data/demo

.PHONY: venv venv-gpu test test-fast demo lint format bench-features bench-score clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet torch==2.13.0 $(FBGEMM)
	# torchrec declares a dependency on the CUDA fbgemm-gpu; its real dependencies are in pyproject.toml.
	$(PIP) install --quiet --no-deps torchrec==1.8.0
	$(PIP) install --quiet -e ".[dev]"
	touch $@

venv-gpu:
	$(MAKE) venv FBGEMM=fbgemm-gpu==1.8.0

test: venv
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

demo: venv
	$(PY) -m pipelines.demo --out $(DEMO_DIR)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench-features: venv
	$(PY) -m benchmarks.features_bench --impressions 10000000

bench-score: venv
	$(PY) -m benchmarks.score_bench --rows 10000000

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
