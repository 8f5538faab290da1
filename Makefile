# Two entry points: `make demo` (set up + run the main job) and `make test` (set up + run tests).
# Each creates .venv on first use with torch pinned by constraints/cpu.txt (the CPU wheel);
# `make test` and `make test-slow` also install the tests' real data (target `data`).
# A GPU user installs their CUDA torch into the venv first; the pinned install then keeps it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ulr-installed
PYTEST_ARGS ?=

.PHONY: demo data test test-slow lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml constraints/cpu.txt | $(BIN)/python
	$(BIN)/pip install -q -c constraints/cpu.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ulr train

# Fashion-MNIST and WordNet as Debian packages, when missing, as root with apt-get; otherwise
# (or if the install fails) a warning, and the tests that need them skip with the reason.
data:
	@sh scripts/install-data.sh

# pytest exits 5 when a selection collects no test: reported, not treated as a failure.
test: $(STAMP) data
	$(BIN)/python -m pytest -q -m "not slow" --doctest-modules src/ulr tests $(PYTEST_ARGS); \
	rc=$$?; [ $$rc -eq 5 ] && echo "pytest: no tests collected" && rc=0; exit $$rc

test-slow: $(STAMP) data
	$(BIN)/python -m pytest -q -m slow tests $(PYTEST_ARGS); \
	rc=$$?; [ $$rc -eq 5 ] && echo "pytest: no slow tests collected" && rc=0; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check src tests examples benchmarks

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info src/*.egg-info
