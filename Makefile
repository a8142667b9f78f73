# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# The CUDA build of torch on this machine's disk; pip caps it at these versions.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install system-deps asyncapi-deps test lint format demo up bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# System tools the tests need (docker-compose validates compose/ offline).
system-deps:
	bash scripts/ci-system-deps.sh

# The official AsyncAPI parser (tests/test_asyncapi.py), pinned in tests/asyncapi/package-lock.json;
# reinstalled only when node_modules is missing or the lock changed. Install scripts are off.
ASYNCAPI_DIR := tests/asyncapi
$(ASYNCAPI_DIR)/node_modules/.installed: $(ASYNCAPI_DIR)/package.json $(ASYNCAPI_DIR)/package-lock.json | system-deps
	npm ci --prefix $(ASYNCAPI_DIR) --ignore-scripts --no-audit --no-fund
	touch $@

asyncapi-deps: $(ASYNCAPI_DIR)/node_modules/.installed

test: install system-deps asyncapi-deps
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# A whole local stack on the toy profile: broker, workers, webhook dispatcher, gateway and
# gallery (http://127.0.0.1:8080); Ctrl-C stops it.
up: install
	$(BIN)/genseg up --models toy

demo: install
	$(BIN)/genseg demo "a red circle next to a blue square" --target "red circle" --models toy

clean:
	rm -rf $(VENV) genseg-out .pytest_cache
