# fersearch: every target installs what it needs first, so a fresh clone needs no extra step.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  ?= cnn
DATA   ?= synthetic
EPOCHS ?= 30
OUT    ?= mlruns/runs/$(MODEL)

.PHONY: install test test-all sanitize lint smoke bench train

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null
	$(BIN)/pip install -e '.[dev]'
	touch $@

# Two tiers, the same real parts (Ray, MLflow stores, a real search, the app): `make test` is the
# everyday one (the tests marked slow left out); `make test-all` runs every test, and CI runs it.
test: install
	$(BIN)/pytest -q -m "not slow"

test-all: install
	$(BIN)/pytest -q --durations=25

# The kernel tests against a build of csrc/cpu_kernels.c with AddressSanitizer and UBSan (CI runs
# it after `make test-all`). Python is not built with ASan, so the runtimes are preloaded; leak
# checking is off because the interpreter frees nothing at exit by design. -s lets a sanitizer
# report reach the terminal before it aborts the run.
sanitize: install
	FERSEARCH_NATIVE_SANITIZE=1 \
	LD_PRELOAD="$$($${CC:-cc} -print-file-name=libasan.so) $$($${CC:-cc} -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	$(BIN)/pytest -q -s -p no:cacheprovider tests/test_kernels.py

lint: install
	$(BIN)/ruff check fersearch tests bench

smoke: install
	$(BIN)/fersearch train --model $(MODEL) --data synthetic --epochs 1 --smoke --out mlruns/runs/smoke-$(MODEL) --overwrite

bench: install
	$(BIN)/python bench/throughput.py

train: install
	$(BIN)/fersearch train --model $(MODEL) --data $(DATA) --epochs $(EPOCHS) --out $(OUT) --overwrite

# ---- search (issue: Ray Tune + Optuna + ASHA + MLflow)
# On the synthetic stand-in a search takes 8 minutes (4-epoch trials: a finished leader needs about 4 of them on 2 cores).
# On FERPlus give the real budget. Unset values fall back to the CLI's defaults (fersearch/config.py), defined once there.
TRIALS         ?=
MAX_EPOCHS     ?= $(if $(filter synthetic,$(DATA)),4)
GRACE_PERIOD   ?=
SPACE          ?=
TIME_BUDGET    ?= $(if $(filter synthetic,$(DATA)),8m)
CPUS_PER_TRIAL ?=
GPUS_PER_TRIAL ?= 0
NAME           ?=
SEARCH_FLAGS   := --model $(MODEL) --data $(DATA) $(if $(TRIALS),--trials $(TRIALS)) \
                  --gpus-per-trial $(GPUS_PER_TRIAL) \
                  $(if $(MAX_EPOCHS),--max-epochs $(MAX_EPOCHS)) \
                  $(if $(GRACE_PERIOD),--grace-period $(GRACE_PERIOD)) \
                  $(if $(SPACE),--space $(SPACE)) \
                  $(if $(TIME_BUDGET),--time-budget $(TIME_BUDGET)) \
                  $(if $(CPUS_PER_TRIAL),--cpus-per-trial $(CPUS_PER_TRIAL)) \
                  $(if $(NAME),--name $(NAME))

.PHONY: search ui app

search: install
	$(BIN)/fersearch search $(SEARCH_FLAGS) $(EXTRA)

ui: install
	$(BIN)/fersearch ui --mlruns mlruns $(if $(PORT),--port $(PORT))

# The web app (pick a model, classify a photo, live camera); BUNDLE=DIR adds a folder.
app: install
	$(BIN)/fersearch app --mlruns mlruns $(if $(PORT),--port $(PORT)) $(if $(BUNDLE),--bundle $(BUNDLE))

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
