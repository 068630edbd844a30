# The README's two commands. Both create .venv when missing and are safe to rerun.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
STORAGE ?= $(CURDIR)/results
MLFLOW_DB ?= $(CURDIR)/mlflow.db

.PHONY: demo test install clean
# the UI opens MLflow 3's GenAI overview (traces, none here); this URL opens the study's runs table instead
export RUNS_URL := import sys; from trainables.mlflow_store import open_client, runs_url; \
	print(runs_url(sys.argv[1], open_client(sys.argv[1]).get_experiment_by_name(sys.argv[2]).experiment_id))

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the project's dependency files change.
$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

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

# two workers, one module (or group of modules) at a time each: tests/conftest.py, pytest_xdist_make_scheduler
test: $(STAMP)
	$(PY) -m pytest -n 2

clean:
	rm -rf $(VENV) results mlflow.db mlflow.db.lock
