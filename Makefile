# The two commands: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= workdir/demo

.PHONY: demo test bench venv clean

$(STAMP): setup.py constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,torch,synth,tpu]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m embedder.demo --workdir $(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest -q --durations=25 tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

bench: $(STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) workdir
