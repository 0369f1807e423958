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

.PHONY: install run test bench clean

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

clean:
	rm -rf .pytest_cache build *.egg-info
