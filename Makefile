# Set-up and checks for jtml. `make demo` and `make test` install on first use.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -c constraints.txt -e '.[dev,onnx]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/jtml fit --config experiments/demo_seg.yaml

lint: $(STAMP)
	$(BIN)/ruff check jtml tests benchmarks
	$(BIN)/ruff format --check jtml tests benchmarks

test: $(STAMP)
	$(BIN)/ruff check jtml tests benchmarks
	$(BIN)/python -m pytest -q --durations=25 --nbmake tests examples

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs wandb .pytest_cache .ruff_cache
