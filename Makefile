# One command each, from a fresh clone: a local environment in .venv, then the demo or the tests.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# The documentation tools, on top of the environment above.
$(VENV)/.docs-installed: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[dev,docs]"
	touch $@

.PHONY: install demo test test-fast bench gpu-check docs docs-serve
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/g3n-probe demo

# Every test, on 2 xdist workers of one thread each (two processes of 2 OpenMP threads on 2 cores slow both
# ~100x). test-fast: the same without the slow lanes (notebooks, fuzz, torchrun, grids, the CPU GPU check).
test: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2

test-fast: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 -m "not slow"

# The site from docs/ into site/, offline; --strict: a broken link, a missing page or a warning fails it.
docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# Serves the site on this machine only, rebuilding on change.
docs-serve: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --dev-addr 127.0.0.1:8000

bench: $(VENV)/.installed
	$(PY) benchmarks/load_bench.py --preset tiny

# On a machine with a GPU: every performance target, stock beside g3n_probe, in one run (writes the
# synthetic e2b checkpoint first); exits 1 on a missed target. Table in benchmarks/results/gpu_check_cuda_e2b.md.
gpu-check: $(VENV)/.installed
	$(VENV)/bin/g3n-probe bench --device cuda --preset e2b --check --leak-traces 100
