# Set-up is part of every target: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast bench lint clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

demo: install
	$(BIN)/ditmoe demo --out runs/digits-demo

test: install
	$(BIN)/pytest -q

bench: install
	$(BIN)/python bench/bench_moe_cpu.py
	$(BIN)/python bench/bench_kernels.py

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf runs data .pytest_cache .ruff_cache
