# One command each, from a fresh clone: a local environment in .venv, then the demo or the tests.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

.PHONY: install demo test bench gpu-check
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/g3n-probe demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/load_bench.py --preset tiny

# On a machine with a GPU: every performance target, stock beside g3n_probe, in one run (writes the
# synthetic e2b checkpoint first); exits 1 on a missed target. Table in benchmarks/results/gpu_check_cuda_e2b.md.
gpu-check: $(VENV)/.installed
	$(VENV)/bin/g3n-probe bench --device cuda --preset e2b --check --leak-traces 100
