# Two commands: `make run` (the demo on SQLite) and `make test` (every test, SQLite and PostgreSQL).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run serve test install bench clean

$(BIN)/spacebell: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/spacebell

install: $(BIN)/spacebell

run: install
	$(BIN)/spacebell demo

serve: install
	$(BIN)/spacebell serve

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) spacebell.db* demo-data
