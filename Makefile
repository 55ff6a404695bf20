# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: demo test test-fast gpu-check lint format clean

# The demo needs only the package; tests and lint add the dev extras (pytest, ruff, timm,
# transformers, optuna) on top.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(DEV_STAMP)

# The embedded default: a local Ray and the MLflow store ./mlflow.db (or MLFLOW_TRACKING_URI).
demo: $(STAMP)
	$(BIN)/vitray demo

# The full suite, end-to-end runs on real Ray and MLflow included: what CI runs.
test: $(DEV_STAMP) lint
	$(BIN)/pytest -q --durations=15 tests

# Everything but tests/e2e and the tests whose fixtures start a Ray or a server (marked `ray`,
# `server` in tests/conftest.py): no Ray, no MLflow or S3 server, under 3 minutes on 2 cores.
test-fast: $(DEV_STAMP) lint
	$(BIN)/pytest -q --durations=10 tests --ignore=tests/e2e -m "not ray and not server"

# On a machine with a CUDA GPU: bf16 training (eager and compiled, a worker killed and
# resumed), a Tune search, predict, fused AdamW, checkpointed blocks and the model
# benchmark's MFU. Skipped without CUDA. An existing venv is used as it is: a copied tree's
# newer pyproject.toml must not start a reinstall on a machine without a package registry.
gpu-check:
	test -x $(BIN)/pytest || $(MAKE) $(DEV_STAMP)
	$(BIN)/pytest -q -rs --durations=10 -m gpu tests/gpu

lint: $(DEV_STAMP)
	$(BIN)/ruff check vit pipeline jobs tests
	$(BIN)/ruff format --check vit pipeline jobs tests

format: $(DEV_STAMP)
	$(BIN)/ruff format vit pipeline jobs tests
	$(BIN)/ruff check --fix vit pipeline jobs tests

clean:
	rm -rf $(VENV) runs mlruns mlflow.db .pytest_cache
