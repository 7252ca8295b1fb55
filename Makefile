# Two commands set everything up on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench reproduce-imagenet toy-data clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/alignpipe run pipelines/toy.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check alignpipe tests

bench: $(STAMP)
	$(BIN)/alignpipe bench all

reproduce-imagenet: $(STAMP)
	$(BIN)/alignpipe run pipelines/reproduce-imagenet.yaml

toy-data: $(STAMP)
	$(BIN)/alignpipe manifest toy data_manifests/toy --rows 600 --seed 0

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
