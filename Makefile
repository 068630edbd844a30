# The README's two commands. Both create .venv when missing and are safe to rerun.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
STORAGE ?= $(CURDIR)/results
MLFLOW_DB ?= $(CURDIR)/mlflow.db

LOCK   := requirements.lock
# the whole tested set (every extra) for the cluster images' Python and platform; `make lock` refreshes it
LOCK_CMD = $(VENV)/bin/uv pip compile pyproject.toml --extra dev --extra cluster --extra gpu -c constraints.txt \
	--generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock"

.PHONY: demo cluster-demo test install lock browser clean
# the UI opens MLflow 3's GenAI overview (traces, none here); this URL opens the study's runs table instead
export RUNS_URL := import sys; from analysis.mlflow_store import open_client, runs_url; \
	print(runs_url(sys.argv[1], open_client(sys.argv[1]).get_experiment_by_name(sys.argv[2]).experiment_id))

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the project's dependency files change: the locked set with its hashes, then the project
# itself without dependencies (pip refuses editable installs in hash-checking mode).
$(STAMP): $(PY) pyproject.toml constraints.txt $(LOCK)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet --require-hashes -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# Resolve pyproject.toml's ranges (and constraints.txt's pins) again, with hashes; then run make test.
lock: $(PY)
	test -x $(VENV)/bin/uv || $(PY) -m pip install --quiet uv
	$(LOCK_CMD) -o $(LOCK)

install: $(STAMP)

demo: $(STAMP)
	$(PY) studies/seg_optimizers.py --quick --overwrite --storage $(STORAGE) --mlflow-uri sqlite:///$(MLFLOW_DB)
	$(PY) -m analysis $(STORAGE)/seg_optimizers --mlflow-uri sqlite:///$(MLFLOW_DB)
	@echo
	@echo "Results:        $(STORAGE)/seg_optimizers  (trials.csv, one folder per trial)"
	@echo "MLflow DB:      $(MLFLOW_DB)"
	@echo "Report:         $(STORAGE)/seg_optimizers/report/index.html"
	@echo "MLflow UI:      $(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///$(MLFLOW_DB)"
	@echo "MLflow runs:    $$($(PY) -c "$$RUNS_URL" sqlite:///$(MLFLOW_DB) seg_optimizers)  (the study's runs table, once the UI is up)"

# The README's cluster set-up on this machine: S3 (moto), PostgreSQL, an MLflow server on both, a two-node Ray;
# a quick study on them, what it cost in S3 (bytes, requests, checkpoint time), then everything stopped.
cluster-demo: $(STAMP)
	$(PY) benchmarks/cluster_demo.py

# two workers, one module (or group of modules) at a time each: tests/conftest.py, pytest_xdist_make_scheduler
# Debian's Chromium renders a report page in the tests; where it cannot be installed that one test says it skipped
browser:
	@command -v chromium >/dev/null || { test "$$(id -u)" = 0 && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -q chromium >/dev/null 2>&1; } || echo "make: no chromium: the page-rendering test skips"

test: $(STAMP) browser
	$(PY) -m pytest -n 2

clean:
	rm -rf $(VENV) results mlflow.db mlflow.db.lock
