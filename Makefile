# Two entry points that work on a fresh machine with Python 3.11+ and no GPU:
#   make demo   - create .venv, install declump (with the test and app extras), generate a sample and separate it
#   make test   - create .venv, install declump with the test and app extras, run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test bench bench-chunked clean

$(BIN)/declump: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,app,app-test]'
	touch $@

demo: $(BIN)/declump
	$(BIN)/declump demo --out demo_output

test: $(BIN)/declump
	$(BIN)/python -m pytest -q -ra

bench: $(BIN)/declump
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m bench

bench-chunked: $(BIN)/declump
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m bench.chunked

clean:
	rm -rf $(VENV) demo_output .pytest_cache
