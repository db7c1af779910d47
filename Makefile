# TrialSync developer entry points. `make demo` and `make test` are the README's Quick start.
SHELL := /bin/bash
VENV  ?= .venv
BIN   := $(VENV)/bin
# Python >= 3.12: .python-version selects 3.12 under pyenv; otherwise the first suitable interpreter.
PYTHON ?= $(shell for p in python3.12 python3.13 python3 python; do \
            if command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; \
            then command -v $$p; break; fi; done)
SCALE ?= 0.01
PYTEST_ARGS ?=

.PHONY: install demo test test-heavy test-all lint stack-up stack-down clean bench lock

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock package.json package-lock.json
	@test -n "$(PYTHON)" || { echo "error: Python >= 3.12 not found (install it, or pyenv install 3.12)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -r requirements.lock
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	@# s3rver (npm) keeps the durable embedded broker's topics on disk; without Node.js the stack
	@# needs TRIALSYNC_BROKER_STORAGE=memory (docs/deployment.md)
	@if command -v npm >/dev/null 2>&1; then npm ci --no-audit --no-fund --omit=dev --loglevel=error >/dev/null; \
	else echo "note: npm not found: durable embedded broker unavailable (set TRIALSYNC_BROKER_STORAGE=memory)"; fi
	@# bytecode of our own modules too: where PYTHONDONTWRITEBYTECODE is set (some CI and container
	@# images) every `trialsync` command otherwise compiles ~300 modules at start-up (~1 s of CPU)
	$(BIN)/python -m compileall -q common consumers producers orchestrator schemas simulator
	@touch $@

demo: install
	$(BIN)/trialsync demo --scale $(SCALE)

# `make test` (CI): everything except the minutes-long `heavy` suites; `make test-heavy` runs those
# (the end-to-end fault scenarios and the benchmark smoke test), `make test-all` both.
test: install lint
	@set +e; $(BIN)/python -m pytest -m "not heavy" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

test-heavy: install
	@set +e; $(BIN)/python -m pytest -m heavy $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

test-all: test test-heavy

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

stack-up: install
	$(BIN)/trialsync stack up

stack-down: install
	$(BIN)/trialsync stack down

bench: install
	$(BIN)/python -m bench.run

# the lock holds the test and bench extras (dlt: the peer in bench/run.py and its smoke test)
lock: install
	$(BIN)/uv pip compile pyproject.toml --extra test --extra bench -o requirements.lock --python-version 3.12

clean:
	-$(BIN)/trialsync demo --stop
	rm -rf $(VENV) .trialsync .pytest_cache .ruff_cache node_modules
