# captionlab: two commands on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
LOCK := requirements/lock.txt
LOCK_CONSTRAINTS := requirements/constraints.txt
LOCK_OVERRIDES := requirements/overrides.txt
TOOLS := .venv-tools
UV_PIN := uv==0.13.9
LATEST := .venv-latest
export CAPTIONLAB_CACHE ?= $(CURDIR)/.cache
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export MPLBACKEND ?= Agg
# glibc's malloc: blocks up to 32 MB come from the heap and 256 MB of freed heap is kept, so the tensors a training
# step frees are reused instead of unmapped and faulted in again (a LoRA captioner epoch: 829k -> 188k page faults,
# 3.6 -> 1.4 s of system time, same result; cold `make test` on 2 cores: 170 -> 118 s of system time, 20 s sooner).
export GLIBC_TUNABLES ?= glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456
export CAPTIONLAB_MAKE_START := $(shell date +%s)  # the report's stage table counts what ran since this make began
PARAMS ?= params/demo.yaml

.PHONY: venv lock test-latest git-filters java chromium test test-fast demo rehearse check bench bench-real-shapes world report clean help

help:
	@echo "make demo   - set up .venv, build the demo world, run every notebook, render reports/"
	@echo "make test   - set up .venv and run the test suite"
	@echo "make rehearse - the course route (params/rehearsal.yaml) at the real shapes with random weights, on CPU"
	@echo "make check  - preflight of PARAMS (data, models, tokenizer, tools, GPU memory/time estimates)"
	@echo "make test-fast - the tests that build no demo model (the edit-test loop, < 3 min)"
	@echo "make lock   - re-resolve $(LOCK) from pyproject.toml (UPGRADE=1: newest allowed versions)"
	@echo "make test-latest - the suite in $(LATEST) with the newest versions pyproject.toml allows"
	@echo "make bench  - run the benchmarks (reports/bench/)"
	@echo "make bench-real-shapes - feature caching at the real ViT-L/14 + GPT-2 small shapes (CPU)"

# Every dependency comes from the lock (the versions the suite passed with); the stamp depends on the lock and
# pyproject.toml, so a change to either reinstalls. uv installs it (~1 min instead of pip's ~4), reading the same
# package sources as pip (requirements/uv_args.py); pip is the fallback when uv cannot be had. The torch pin
# is explicit (on our machines it comes from local disk).
# uv does not compile bytecode at install time: Python writes each module's .pyc on its first import instead, so
# the make targets do not inherit PYTHONDONTWRITEBYTECODE (set on some machines; then every process would
# recompile transformers from source).
unexport PYTHONDONTWRITEBYTECODE
UV := $(TOOLS)/bin/uv
# The packages $(LOCK_OVERRIDES) leaves out (its never-true markers): pip has no overrides, so its fallback removes them.
OVERRIDDEN := 's/^\([A-Za-z0-9_.-]*\) *;.*"never".*/\1/p'
$(VENV)/.installed: $(LOCK) $(LOCK_OVERRIDES) pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@date +%s > $(VENV)/.install-start
	@if [ -x $(UV) ] || $(MAKE) --no-print-directory $(UV) >/dev/null 2>&1; then \
	  echo "Installing $(LOCK) into $(VENV) with uv..."; \
	  $(UV) pip install -q --python $(PY) $$($(PYTHON) requirements/uv_args.py) -c $(LOCK_CONSTRAINTS) \
	    --overrides $(LOCK_OVERRIDES) $(TORCH_PIN) -r $(LOCK) && $(UV) pip install -q --python $(PY) --no-deps -e .; \
	else \
	  echo "uv unavailable ($(UV_PIN)): installing $(LOCK) with pip (slower)..."; \
	  $(PIP) install -q -U pip && $(PIP) install -q $(TORCH_PIN) && $(PIP) install -q -r $(LOCK) && \
	  $(PIP) install -q --no-deps -e . && $(PIP) uninstall -q -y $$(sed -n $(OVERRIDDEN) $(LOCK_OVERRIDES)); \
	fi
	@echo $$(( $$(date +%s) - $$(cat $(VENV)/.install-start) )) > $@  # seconds, shown in the report's stage times

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

# Headless Chromium prints the HTML report to PDF; without it the report is HTML only (with a warning). After java
# (order only): two apt-gets at once would race for the dpkg lock.
chromium: | java
	@if (command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || command -v google-chrome >/dev/null 2>&1) \
	    && command -v pdfunite >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "Installing chromium and poppler-utils for PDF rendering..."; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium poppler-utils >/dev/null) \
	  || echo "WARNING: could not install chromium; reports will be HTML only."; \
	else echo "WARNING: chromium is missing (sudo apt-get install chromium); reports will be HTML only."; fi

# test, demo and rehearse start with the venv and Chromium, installed side by side (-j2; mostly disk and network).
SETUP = @$(MAKE) --no-print-directory -j2 venv chromium

# The suite runs on every core (pytest-xdist; TEST_JOBS=0: one process). The demo models build in the background
# meanwhile (tests/conftest.py), and the tests that need them run last.
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; [ $$n -lt 2 ] && n=0; echo $$n)
test:
	$(SETUP)
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadgroup --durations=20 $(PYTEST_ARGS)

# The edit-test loop: no demo model builds (tiny random models and the generated data only), under 3 min on 2 cores.
test-fast: venv
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadgroup -m "not slow and not demo_models" --durations=10 $(PYTEST_ARGS)

# The lock: pyproject.toml's ranges (+ dev extra) under $(LOCK_CONSTRAINTS) and $(LOCK_OVERRIDES) (packages left
# out), resolved by uv for this Python.
# Versions already in the lock are kept unless UPGRADE=1 (then: the newest the ranges allow).
# uv itself: into $(TOOLS) with the system pip (5 s), else in a venv of its own (10 s: the venv installs pip first).
$(UV):
	@$(PYTHON) -m pip install -q --target $(TOOLS) $(UV_PIN) || { rm -rf $(TOOLS) && $(PYTHON) -m venv $(TOOLS) && \
	  $(TOOLS)/bin/pip install -q $(UV_PIN); }

lock: $(UV)
	$(UV) pip compile pyproject.toml --extra dev -c $(LOCK_CONSTRAINTS) --overrides $(LOCK_OVERRIDES) \
	  --python-version $$($(PYTHON) -c 'import platform; print(platform.python_version())') \
	  --custom-compile-command "make lock" $(if $(UPGRADE),--upgrade) -o $(LOCK)

# Drift check: a separate venv with the newest versions the ranges allow (no lock), then the whole suite.
# The versions it got are written to reports/latest-versions.txt.
test-latest: java
	@test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q -U pip
	$(LATEST)/bin/pip install -q -U --upgrade-strategy eager -e '.[dev]'
	@mkdir -p reports
	$(LATEST)/bin/pip freeze --exclude-editable > reports/latest-versions.txt
	@grep -iE '^(torch|transformers|timm|peft|open.clip.torch|accelerate|tokenizers|papermill)==' reports/latest-versions.txt
	$(LATEST)/bin/python -m pytest -q $(PYTEST_ARGS)

world: venv
	$(VENV)/bin/captionlab world build --models

demo:
	$(SETUP)
	$(VENV)/bin/captionlab report run --params $(PARAMS)

# The course route rehearsed on CPU: hw3_data-shaped photos + random-weight checkpoints at the real shapes
# ({cache}/rehearsal, ~2.6 GB, ~1 min to build), then every notebook on params/rehearsal.yaml.
# REHEARSE_DTYPE=bfloat16 runs the bf16 paths the GPU route uses (slow on CPUs without bf16 units).
REHEARSE_DTYPE ?=
rehearse:
	$(SETUP)
	$(VENV)/bin/captionlab world build --rehearsal
	CAPTIONLAB_DTYPE=$(REHEARSE_DTYPE) $(VENV)/bin/captionlab report run --params params/rehearsal.yaml

check: venv
	$(VENV)/bin/captionlab report check --params $(PARAMS)

bench: venv
	$(PY) benchmarks/run.py

# Feature caching at the real HW3 shapes (random-weight ViT-L/14 + GPT-2 small on this CPU; ~3 min, 2 GB of /tmp).
bench-real-shapes: venv
	$(PY) benchmarks/real_shapes.py

clean:
	rm -rf reports/* .pytest_cache
