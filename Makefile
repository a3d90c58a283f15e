# Quick start: `make demo` (whole pipeline on the bundled digits, local Ray) and `make test`.
# Both build .venv from constraints.txt on first use; only Python 3.11 is needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: setup demo test test-fast bench bench-report clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --no-cache-dir -c constraints.txt -e '.[dev]'
	touch $@

setup: $(STAMP)  ## create .venv with every dependency pinned

demo: $(STAMP)  ## the whole pipeline on digits; serves until Ctrl-C
	$(BIN)/raydistill run --config configs/demo.yaml $(ARGS)

test: $(STAMP)  ## the whole test suite (includes a real `ray job submit` end to end)
	$(BIN)/python -m pytest -q $(ARGS)

test-fast: $(STAMP)  ## everything but the end-to-end job test
	$(BIN)/python -m pytest -q -m "not e2e" $(ARGS)

bench: $(STAMP)  ## every benchmark in bench/ (each writes its record to bench/results/)
	@set -e; for b in bench/*.py; do case $$b in bench/harness.py|bench/report.py) continue;; esac; \
		echo "== $$b"; $(BIN)/python $$b $(ARGS); done

bench-report: $(STAMP)  ## docs/benchmarks.md (tables and plots) from the records in bench/results/
	$(BIN)/python bench/report.py

clean:
	rm -rf $(VENV) runs .pytest_cache
