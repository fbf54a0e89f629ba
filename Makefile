# fersearch: every target installs what it needs first, so a fresh clone needs no extra step.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  ?= cnn
DATA   ?= synthetic
EPOCHS ?= 30
OUT    ?= mlruns/runs/$(MODEL)

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
	$(BIN)/fersearch train --model $(MODEL) --data synthetic --epochs 1 --smoke --out mlruns/runs/smoke-$(MODEL) --overwrite

bench: install
	$(BIN)/python bench/throughput.py

train: install
	$(BIN)/fersearch train --model $(MODEL) --data $(DATA) --epochs $(EPOCHS) --out $(OUT) --overwrite

# ---- search (issue: Ray Tune + Optuna + ASHA + MLflow)
# On the synthetic stand-in a search should take minutes; on FERPlus use the real budget.
# Unset values fall back to the CLI's defaults (fersearch/config.py), defined once there.
TRIALS         ?= $(if $(filter synthetic,$(DATA)),20)
MAX_EPOCHS     ?= $(if $(filter synthetic,$(DATA)),6)
SPACE          ?=
TIME_BUDGET    ?=
CPUS_PER_TRIAL ?=
GPUS_PER_TRIAL ?= 0
NAME           ?=
SEARCH_FLAGS   := --model $(MODEL) --data $(DATA) $(if $(TRIALS),--trials $(TRIALS)) \
                  --gpus-per-trial $(GPUS_PER_TRIAL) \
                  $(if $(MAX_EPOCHS),--max-epochs $(MAX_EPOCHS)) \
                  $(if $(SPACE),--space $(SPACE)) \
                  $(if $(TIME_BUDGET),--time-budget $(TIME_BUDGET)) \
                  $(if $(CPUS_PER_TRIAL),--cpus-per-trial $(CPUS_PER_TRIAL)) \
                  $(if $(NAME),--name $(NAME))

.PHONY: search ui

search: install
	$(BIN)/fersearch search $(SEARCH_FLAGS) $(EXTRA)

ui: install
	$(BIN)/fersearch ui --mlruns mlruns --host 127.0.0.1 --port $(or $(PORT),5000)

# ---- after a search: export the best trial, write the study report
SEARCH  ?=
SEEDS   ?= 3
.PHONY: export report repeat

export: install
	$(BIN)/fersearch export --model $(MODEL) $(if $(SEARCH),--search $(SEARCH)) --out $(or $(EXPORT_OUT),mlruns/exports/$(MODEL)-$(or $(SEARCH),latest))

report: install
	$(BIN)/fersearch report --model $(MODEL) $(if $(SEARCH),--search $(SEARCH)) --out $(or $(REPORT_OUT),mlruns/reports/$(MODEL)-$(or $(SEARCH),latest))

repeat: install
	$(BIN)/fersearch repeat --model $(MODEL) $(if $(SEARCH),--search $(SEARCH)) --seeds $(SEEDS)
