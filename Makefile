# Two commands: `make run` (the main job on the quickstart preset) and `make test`.
# Both create .venv and install the package into it once; a stamp file stops reinstalls.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.snp-installed
SHARED_DATA := $(abspath ../shared/data)

ifeq ($(origin SNP_DATA_ROOT), undefined)
ifneq ($(wildcard $(SHARED_DATA)),)
export SNP_DATA_ROOT := $(SHARED_DATA)
endif
endif
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1

.PHONY: install run test results bench clean cluster submit cluster-stop learnware-env

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -c constraints.txt -e '.[test,onnx]'
	@touch $(STAMP)

run: $(STAMP)
	$(PY) jobs/slice_market.py --preset quickstart

test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=15 $(PYTEST_ARGS)

# Every published table, figure, sweep, study and benchmark, regenerated from this code into
# docs/results (stages whose inputs are unchanged are skipped; `RESULTS_ARGS='--list'` lists them,
# `RESULTS_ARGS='--only T6,T7'` picks some). Hours on a 2-core machine for all of them.
results: $(STAMP) $(VENV)/.snp-text
	$(PY) jobs/reproduce_all.py $(RESULTS_ARGS)

# the `text` extra (gensim's word2vec, for the static tables of stages T6-static and T7-static):
# installed for `make results`, never for `make test`
$(VENV)/.snp-text: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[text]'
	@touch $@

# The learnware package (LAMDA's learnware market, its reusers) in its own environment: it pulls
# transformers, trl, peft and lm_eval, so it never enters make test's install. Used by
# jobs/learnware_benchmark.py --learnware-python .venv-learnware/bin/python (issue #25).
# EnsemblePruningReuser needs geatpy, whose official 2.7.0 has no Python 3.11 wheel: geatpy-rs
# (a third party's Rust port, installed as the module geatpy) stands in, and RESULTS says so.
LW_VENV ?= .venv-learnware
learnware-env: $(LW_VENV)/.installed

$(LW_VENV)/.installed: constraints-learnware.txt
	@test -x $(LW_VENV)/bin/python || python3 -m venv $(LW_VENV)
	$(LW_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LW_VENV)/bin/python -m pip install -c constraints-learnware.txt torch torchvision \
	  learnware==0.4.0.post1 torch-optimizer lightgbm geatpy-rs
	@touch $@

# A local Ray head with token auth, started from .venv so that a job's `python` is the venv's
# (`ray start` outside the venv gives jobs the system python: "No module named 'torch'").
# The token lives in RAY_AUTH_TOKEN_PATH (default ~/.ray/auth_token, created if missing); any
# client needs RAY_AUTH_MODE=token and that token, as `make submit` sets them.
RAY := $(VENV)/bin/ray
VENV_BIN := $(abspath $(VENV))/bin
RAY_AUTH_TOKEN_PATH ?= $(HOME)/.ray/auth_token
CLUSTER_DIR ?= /tmp/snp-ray-cluster
RAY_PORT ?= 6379
DASHBOARD_HOST ?= 127.0.0.1
DASHBOARD_PORT ?= 8265
RAY_JOB_ADDRESS ?= http://127.0.0.1:$(DASHBOARD_PORT)
ARGS ?= --preset quickstart --store $(CURDIR)/runs/quickstart
TOKEN_ENV = RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$(RAY_AUTH_TOKEN_PATH)"

cluster: $(STAMP)
	@test -s "$(RAY_AUTH_TOKEN_PATH)" || { mkdir -p "$(dir $(RAY_AUTH_TOKEN_PATH))" && \
	  (umask 077; $(PY) -c 'import secrets; print(secrets.token_hex(32), end="")' \
	  > "$(RAY_AUTH_TOKEN_PATH)") && echo "created the Ray auth token $(RAY_AUTH_TOKEN_PATH)"; }
	PATH="$(VENV_BIN):$$PATH" $(TOKEN_ENV) $(RAY) start --head --port=$(RAY_PORT) \
	  --dashboard-host=$(DASHBOARD_HOST) --dashboard-port=$(DASHBOARD_PORT) \
	  --temp-dir=$(CLUSTER_DIR) --disable-usage-stats $(RAY_START_ARGS)
	@echo "Ray head up (token auth on): job API $(RAY_JOB_ADDRESS), token in $(RAY_AUTH_TOKEN_PATH)"
	@echo "jobs run with $(VENV_BIN)/python; submit with: make submit [ARGS='...']; stop: make cluster-stop"

submit: $(STAMP)
	$(TOKEN_ENV) $(RAY) job submit --address $(RAY_JOB_ADDRESS) --working-dir . \
	  -- python jobs/slice_market.py $(ARGS)

cluster-stop: $(STAMP)
	$(PY) -m snp_ray.engine.localcluster stop $(CLUSTER_DIR)

clean:
	rm -rf .pytest_cache build *.egg-info
