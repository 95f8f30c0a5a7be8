# Two commands: `make lab` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
ARGS   ?=
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

ROOT_FLAG := $(shell [ "$$(id -u)" = "0" ] && echo --allow-root)

.PHONY: lab test install clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks --ServerApp.ip=127.0.0.1 $(ROOT_FLAG) $(ARGS)

# LABKIT_SOLUTIONS=1: exercises left as stubs are checked with their worked solutions (see README).
test: $(STAMP)
	LABKIT_SOLUTIONS=1 $(PY) -m pytest tests -q
	LABKIT_SOLUTIONS=1 $(PY) -m pytest --nbval-lax --nbval-sanitize-with notebooks/sanitize.cfg notebooks -q \
		-p no:cacheprovider --durations=0

clean-venv:
	rm -rf $(VENV)
