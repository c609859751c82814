# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
OUT ?= OUT
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done

.PHONY: demo test test-all setup bench clean

demo: $(STAMP)
	$(PY) -m llm_cxr demo --out $(OUT)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m "not gpu"

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_env.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup_env.sh

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(OUT) build *.egg-info
