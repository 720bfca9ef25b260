# Two entry points: `make demo` (the main job on the embedded synthetic dataset) and `make test`
# (the whole suite, as CI runs it). Both create .venv at the repository root on first use.
# `make test-fast` is the inner loop while developing: tests/ without the ones marked slow.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: demo test test-fast lint format sync wheels bench clean

$(VENV)/.kit: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.kit
	$(PIP) -e '.[dev]'
	touch $@

demo: $(VENV)/.kit
	$(PY) -m kit demo

test: $(VENV)/.dev lint
	$(PY) -m pytest tests/
	MPLBACKEND=Agg $(PY) -m pytest --nbmake --nbmake-timeout=1500 notebooks/

test-fast: $(VENV)/.dev
	$(PY) -m pytest -m "not slow" tests/

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check kit tests bench scripts notebooks/*.py
	$(VENV)/bin/ruff format --check kit tests bench scripts

format: $(VENV)/.dev
	$(VENV)/bin/ruff format kit tests bench
	$(VENV)/bin/ruff check --fix kit tests bench

# Rewrite each notebook's .ipynb from its .py (the .py is the source of truth).
sync: $(VENV)/.dev
	$(PY) scripts/sync_notebooks.py

wheels: $(VENV)/.dev
	$(PY) -m kit wheels

bench: $(VENV)/.dev
	$(PY) bench/rle.py
	$(PY) bench/loader.py
	$(PY) bench/predict.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
