# Two commands do all the set-up: `make demo` and `make test`. Each creates or reuses .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.amt-installed
TEST_STAMP := $(VENV)/.amt-test-installed
# torch/torchvision pinned for the project's own environment; the package metadata states ranges.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-slow venv pool study clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[autoattack]' $(TORCH_PINS)
	touch $(STAMP)

# the tests also need pytest, ruff, peft (export round trip) and the browser app's Gradio and Playwright
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,app,autoattack]' $(TORCH_PINS)
	touch $(TEST_STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/amt demo --config configs/embedded.yaml --out runs/demo

test: $(TEST_STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q

# The pool `make demo` evaluates (src/amt/assets/glyph_pool): the `train:`/`pool:` recipe of configs/embedded.yaml,
# then exported without training state, with the sha256 of every file (about 10 minutes on 2 CPU cores).
pool: $(STAMP)
	$(VENV)/bin/amt train --config configs/embedded.yaml --out runs/glyph_pool --resume
	$(VENV)/bin/amt export-pool runs/glyph_pool src/amt/assets/glyph_pool

# Which part of AMT does what (docs/results.md): 5 variants x 3 training seeds, 10 rows, about 35 minutes on 2 cores.
study: $(STAMP)
	$(VENV)/bin/amt study --config configs/embedded.yaml --out runs/study

test-slow: $(TEST_STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf runs .cache
