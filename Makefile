# Two commands set everything up on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench reproduce-imagenet reproduce-imagenet-curated toy-data clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

TOY_CLASSES := red circle,red square,red triangle,red cross,green circle,green square,green triangle,green cross,blue circle,blue square,blue triangle,blue cross,yellow circle,yellow square,yellow triangle,yellow cross,purple circle,purple square,purple triangle,purple cross,orange circle,orange square,orange triangle,orange cross

demo: $(STAMP)
	$(BIN)/alignpipe run pipelines/toy.yaml
	@echo "== predict: zero-shot classes of four test images (true classes: red circle, purple circle, purple cross, orange circle)"
	$(BIN)/alignpipe predict runs/toy/image-text data_manifests/toy/images/000/000016.png \
	    data_manifests/toy/images/000/000020.png data_manifests/toy/images/000/000025.jpg \
	    data_manifests/toy/images/000/000029.jpg --classes "$(TOY_CLASSES)" --top-k 3
	@echo "== search: the toy images closest to a caption"
	$(BIN)/alignpipe search runs/toy/image-text --store cache/toy/efficientnet-lite0 \
	    --query "a big red circle" --k 5

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check alignpipe tests

bench: $(STAMP)
	$(BIN)/alignpipe bench all

reproduce-imagenet: $(STAMP)
	$(BIN)/alignpipe run pipelines/reproduce-imagenet.yaml

reproduce-imagenet-curated: $(STAMP)
	$(BIN)/alignpipe run pipelines/reproduce-imagenet-curated.yaml

toy-data: $(STAMP)
	$(BIN)/alignpipe manifest toy data_manifests/toy --rows 600 --seed 0

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
