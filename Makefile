# Every target creates or updates the virtualenv itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STATE ?= .state/demo

.PHONY: run test check lint types arch bench soak fuzz clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

## run: start the sandbox, send a demo message through STARTTLS + XOAUTH2, show what arrived
run: $(STAMP)
	$(BIN)/smtp365 demo --state-dir $(STATE)

## test: the whole test suite
test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

types: $(STAMP)
	$(BIN)/mypy

arch: $(STAMP)
	$(BIN)/lint-imports

## check: lint + types + architecture contracts + tests
check: lint types arch test

## bench: performance figures (printed, never asserted)
soak: $(STAMP)
	SOAK_MESSAGES=$${SOAK_MESSAGES:-10000} $(BIN)/python -m pytest -q -s --timeout=0 tests/e2e/test_soak.py

fuzz: $(STAMP)
	seed=$${FUZZ_SEED:-$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}; echo "FUZZ_SEED=$$seed"; \
	FUZZ_SEED=$$seed FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-3000} \
	$(BIN)/python -m pytest -q -s --timeout=0 tests/relay/test_fuzz_listener.py tests/relay/test_session_machine.py \
		tests/relay/test_fuzz_delivery.py tests/integration/sandbox/test_sandbox_fuzz.py

bench: $(STAMP)
	$(BIN)/python bench/send_throughput.py
	$(BIN)/python bench/doctor_time.py
	$(BIN)/python bench/queue_store.py

clean:
	rm -rf $(VENV) .state .mypy_cache .ruff_cache .pytest_cache
