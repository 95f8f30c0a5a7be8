# Two commands: `make lab` and `make test`. Both create .venv on first use.
# For teaching (notebooks/INSTRUCTOR.md): `make slides` and `make book`, offline HTML in build/.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
ARGS   ?=
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

ROOT_FLAG := $(shell [ "$$(id -u)" = "0" ] && echo --allow-root)

.PHONY: lab test install clean-venv slides book

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

# reveal.js decks of the executed notebooks (build/slides/index.html); reveal.js comes from npm once
# (`npm pack`, sha512 pinned in labkit/workshop/build.py), plotly.js from the installed plotly package.
slides: $(STAMP)
	$(PY) -m labkit.workshop.build slides

# the executed series as a static site (build/book/index.html), every figure drawn offline
book: $(STAMP)
	$(PY) -m labkit.workshop.build book

clean-venv:
	rm -rf $(VENV)
