# Set-up is part of every target: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench bench-train inspect lint clean

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
	$(BIN)/python bench/bench_train.py

# whole training steps: S/2 and XL/2-8E2A on CUDA (triton, torch, naive backends); a tiny model on CPU
bench-train: install
	$(BIN)/python bench/bench_train.py

# what the compiler makes of the kernels for sm_90 (regs, spills, wgmma, pipelining); no GPU needed
inspect: install
	$(BIN)/python -W ignore bench/inspect_kernels.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf runs data .pytest_cache .ruff_cache
