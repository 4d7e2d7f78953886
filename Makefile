PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo lint clean

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) on PATH"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check jlora tests experiments
	$(BIN)/python -m pytest -q -n 2 --durations=15

demo: $(STAMP)
	$(BIN)/python -m jlora.demo

lint: $(STAMP)
	$(BIN)/ruff check jlora tests experiments
	$(BIN)/ruff format --check jlora tests experiments

clean:
	rm -rf $(VENV)
