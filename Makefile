# paperflows: `make run` reproduces every paper at CPU scale; `make test` runs the test suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export DVC_NO_ANALYTICS := 1

.PHONY: setup run test serve clean-results help

help:
	@echo "make run    - set up .venv and reproduce every paper at CPU scale (dvc repro)"
	@echo "make test   - set up .venv and run the test suite"
	@echo "make serve  - Prefect server + workers + MLflow UI on loopback"

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch first: a bare `torch` requirement would resolve to a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

run: setup
	source $(VENV)/bin/activate && dvc repro
	@echo
	@echo "Done. Where to look:"
	@echo "  dvc metrics show              # every paper's numbers and claims (results/<paper>/metrics.json)"
	@echo "  dvc plots show --json         # curves; PNG plots are in results/<paper>/plots/"
	@echo "  $(VENV)/bin/mlflow ui         # MLflow: one experiment per paper, at http://127.0.0.1:5000"
	@echo "  docs/<paper>.md               # what each paper claims, what reproduced, deviations"

serve: setup
	source $(VENV)/bin/activate && python -m flows.serve

test: setup
	source $(VENV)/bin/activate && python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile
