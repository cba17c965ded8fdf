# Two commands set everything up from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-lock

.PHONY: demo test dev bench bench-quick lint lock clean screenshots

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/wan-pipeline demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

dev: $(STAMP)
	$(BIN)/wan-pipeline dev

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/run_all.py --quick

# The README's pictures of the Dagster UI, from what the code does today (headless Chromium:
# Debian's `chromium` package, `apt-get install -y chromium`).
screenshots: $(STAMP)
	@command -v chromium >/dev/null || { echo "screenshots need chromium: apt-get install -y chromium"; exit 1; }
	$(BIN)/python scripts/screenshots.py --out docs

lint: $(STAMP)
	$(BIN)/ruff check wan_pipeline tests benchmarks scripts
	$(BIN)/hadolint Dockerfile

# Re-resolve the pinned versions (needs uv: `pip install uv`).
lock:
	uv pip compile pyproject.toml --extra dev --python-version 3.11 -o requirements.lock

# Everything the project made locally: the virtualenv, the demo's own ledger, outputs and Dagster home
# (data/demo), and the ledger, outputs and Dagster instance of `wan-pipeline run`/`dev`.
clean:
	rm -rf $(VENV) data/demo data/outputs data/ledger.sqlite* .dagster_home
