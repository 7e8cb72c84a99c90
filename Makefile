# Two commands from nothing: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
# The CPU build of torch that lies on this project's machines; set TORCH= to keep one you have.
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(if $(TORCH),$(BIN)/pip install --quiet "$(TORCH)")
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

# The full pipeline on the built-in demo model: directions, a 60-trial study, the trial with fewest refusals saved.
demo: $(BIN)/.installed
	$(BIN)/abliterate --n-trials 60 --n-startup-trials 20 --select min-refusals --output abliterated/demo

test: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks demo
	$(BIN)/ruff format --check src tests benchmarks demo
	scripts/with-postgres $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) abliterated .pytest_cache .ruff_cache
