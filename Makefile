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

# The CPU benchmarks, at sizes that finish in about 15 minutes on the 2-core machine (each
# script's defaults unless named here): event plane 5 rounds of 40,000 records (the first
# 10,000 its warm-up, timed apart) and 200 paced; gen worker 9 rounds of 32 requests
# (64 px, 20 steps); pipeline (a) 9 rounds of 32 requests, (b) 4 rounds of 24, (c) 3
# rounds of 6 at 256 px; seg 40 images and the ViT-B cache; scenes 12 views a size;
# quality 300 prompts. Each script's output goes to
# $(BENCH_DIR)/NAME.log; scripts/bench_table.py writes the table of their last-line JSON
# to docs/bench-latest.md and into README.md's Benchmarks section, with a speed probe of
# the machine before and after (bench/machine.py). Run it on a quiet machine.
# The gen worker and pipeline (a) take 9 rounds: their rounds spread by +-8 % on this VM,
# and their medians decide labels at a few percent from the targets.
BENCH_DIR ?= genseg-out/bench
bench: install
	@mkdir -p $(BENCH_DIR)
	@uptime > $(BENCH_DIR)/load-before.txt
	$(BIN)/python -m bench.machine --probe > $(BENCH_DIR)/speed-before.json
	$(BIN)/python bench/event_plane.py --repeats 5 --latency-records 200 > $(BENCH_DIR)/event_plane.log
	$(BIN)/python bench/gen.py --repeats 9 > $(BENCH_DIR)/gen.log
	$(BIN)/python bench/pipeline.py --repeats 9 > $(BENCH_DIR)/pipeline.log
	$(BIN)/python bench/seg.py > $(BENCH_DIR)/seg.log
	$(BIN)/python bench/scenes.py --images 12 > $(BENCH_DIR)/scenes.log
	$(BIN)/python bench/quality.py > $(BENCH_DIR)/quality.log
	$(BIN)/python -m bench.machine --probe > $(BENCH_DIR)/speed-after.json
	$(BIN)/python scripts/bench_table.py $(BENCH_DIR) --out docs/bench-latest.md --readme README.md \
		--load "$$(sed 's/.*load average: //' $(BENCH_DIR)/load-before.txt) before, $$(uptime | sed 's/.*load average: //') after"

clean:
	rm -rf $(VENV) genseg-out .pytest_cache
