# captionlab: two commands on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
export CAPTIONLAB_CACHE ?= $(CURDIR)/.cache
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export MPLBACKEND ?= Agg
PARAMS ?= params/demo.yaml

.PHONY: venv git-filters java chromium test test-fast demo bench bench-real-shapes world report clean help

help:
	@echo "make demo   - set up .venv, build the demo world, run every notebook, render reports/"
	@echo "make test   - set up .venv and run the test suite"
	@echo "make test-fast - the tests that build no demo model (the edit-test loop, < 3 min)"
	@echo "make bench  - run the benchmarks (reports/bench/)"
	@echo "make bench-real-shapes - feature caching at the real ViT-L/14 + GPT-2 small shapes (CPU)"

# The stamp depends on pyproject.toml so a dependency change reinstalls.
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e '.[dev]'
	@touch $@

venv: $(VENV)/.installed java git-filters

# Notebook outputs never reach git: .gitattributes routes *.ipynb through this clean filter (nbstripout), which
# drops outputs, execution counts, cell ids, papermill's injected cell and the run metadata Jupyter/papermill add.
NB_STRIP_KEYS := metadata.language_info metadata.papermill metadata.vscode cell.metadata.papermill \
                 cell.metadata.jp-MarkdownHeadingCollapsed
NB_CLEAN = "$(abspath $(PY))" -m nbstripout --extra-keys "$(strip $(NB_STRIP_KEYS))" --drop-tagged-cells injected-parameters
git-filters:
	@if git rev-parse --git-dir >/dev/null 2>&1; then \
	  git config filter.nbstripout.clean '$(NB_CLEAN)' && git config filter.nbstripout.smudge cat && \
	  git config filter.nbstripout.required true && git config diff.ipynb.textconv '$(NB_CLEAN) -t'; fi

# Java runs the PTB tokenizer (CIDEr exactly as the course grades it) and METEOR.
java:
	@if command -v java >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "Installing Java (default-jre-headless) for the PTB tokenizer..."; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless >/dev/null) \
	  || { echo "ERROR: could not install default-jre-headless; install Java 11+ by hand (CIDEr needs it)."; exit 1; }; \
	else echo "ERROR: java is missing. Install it (Debian/Ubuntu: sudo apt-get install default-jre-headless; conda: conda install openjdk)."; exit 1; fi

# Headless Chromium prints the HTML report to PDF; without it the report is HTML only (with a warning).
chromium:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || command -v google-chrome >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "Installing chromium and poppler-utils for PDF rendering..."; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium poppler-utils >/dev/null) \
	  || echo "WARNING: could not install chromium; reports will be HTML only."; \
	else echo "WARNING: chromium is missing (sudo apt-get install chromium); reports will be HTML only."; fi

test: venv
	$(PY) -m pytest -q --durations=20 $(PYTEST_ARGS)

# The edit-test loop: no demo model builds (tiny random models and the generated data only), under 3 min on 2 cores.
test-fast: venv
	$(PY) -m pytest -q -m "not slow and not demo_models" --durations=10 $(PYTEST_ARGS)

world: venv
	$(VENV)/bin/captionlab world build --models

demo: venv chromium
	$(VENV)/bin/captionlab report run --params $(PARAMS)

bench: venv
	$(PY) benchmarks/run.py

# Feature caching at the real HW3 shapes (random-weight ViT-L/14 + GPT-2 small on this CPU; ~3 min, 2 GB of /tmp).
bench-real-shapes: venv
	$(PY) benchmarks/real_shapes.py

clean:
	rm -rf reports/* .pytest_cache
