# twingpt: every target a user runs. The first target that needs Python builds .venv from nothing.
#   make train     train the default preset with the best backend here      (issue: newcomer's path)
#   make test      the whole test suite
#   make data      build the default dataset (Python's stdlib) and its tokenizer
# Settings pass through as environment variables (NUM_LAYERS=4 make train-cpu) or ARGS="--num-layers 4".

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=
VARIANT ?= sp1024
TRAIN_SHARDS ?= 1

.PHONY: help venv test data data-fineweb clean-venv

help:
	@sed -n '1,6p' Makefile

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[torch,mlx,dev]"
	@touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

data: $(STAMP)
	$(PY) -m data.build_default

data-fineweb: $(STAMP)
	$(PY) -m data.fineweb --variant $(VARIANT) --train-shards $(TRAIN_SHARDS)

clean-venv:
	rm -rf $(VENV)
