# fersearch: every target installs what it needs first, so a fresh clone needs no extra step.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  ?= cnn
DATA   ?= synthetic
EPOCHS ?= 30
OUT    ?= runs/$(MODEL)

.PHONY: install test lint smoke bench train

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null
	$(BIN)/pip install -e '.[dev]'
	touch $@

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check fersearch tests bench

smoke: install
	$(BIN)/fersearch train --model $(MODEL) --data synthetic --epochs 1 --smoke --out runs/smoke-$(MODEL) --overwrite

bench: install
	$(BIN)/python bench/throughput.py

train: install
	$(BIN)/fersearch train --model $(MODEL) --data $(DATA) --epochs $(EPOCHS) --out $(OUT) --overwrite
