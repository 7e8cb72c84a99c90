# Two commands from nothing: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
# The CPU build of torch that lies on this project's machines. TORCH='torch==X' installs another;
# TORCH= installs none of its own, so pip installs torch as an ordinary dependency of the package.
# Either only matters when .venv is created (it is rebuilt only when pyproject.toml changes):
# run `make clean` first. .venv never sees a torch installed outside it.
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
RUFF_PATHS := src tests benchmarks demo

.PHONY: demo test lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(if $(TORCH),$(BIN)/pip install --quiet "$(TORCH)")
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

# The full pipeline on the built-in demo model: directions, a 60-trial study, the trial with fewest refusals saved.
# The demo model (6 layers, trained from scratch) keeps its refusal in the middle of the stack, unlike
# real chat models: it is searched in the wide space with plain mean-difference directions (README).
demo: $(BIN)/.installed
	$(BIN)/abliterate --n-trials 60 --n-startup-trials 20 --search-space wide --direction mean-difference --warm-starts false \
		--select min-refusals --output abliterated/demo

# What `make test` checks first: lint and formatting.
lint: $(BIN)/.installed
	$(BIN)/ruff check $(RUFF_PATHS)
	$(BIN)/ruff format --check $(RUFF_PATHS)

test: lint
	scripts/with-postgres $(BIN)/python -m pytest -q

# Removes .venv (the next `make demo` or `make test` reinstalls), the demo's output and the caches.
clean:
	rm -rf $(VENV) abliterated .pytest_cache .ruff_cache
